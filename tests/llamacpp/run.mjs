// Ask the real llama.cpp (node-llama-cpp's prebuilt CPU build) about GGUF files.
//
//   node tests/llamacpp/run.mjs < request.json > answer.json
//
// request: {"jobs": [{"model": "path.gguf", "tokenize": ["text", ...], "detokenize": [[ids], ...],
//            "greedy": [{"ids": [...], "n": 4}, ...], "logprobs": [[ids], ...]}, ...]}
// answer:  {"results": [{"tokenize": [[ids], ...]  (with the model's own BOS/EOS rule, special text not parsed),
//            "detokenize": ["text", ...], "greedy": [[ids], ...],
//            "logprobs": [[log p(ids[i] | ids[:i]) for i >= 1], ...],
//            "bos": id|null, "eos": id|null, "add_bos": bool}, ...]}
// Nothing is downloaded or built: the binary comes from the installed @node-llama-cpp/linux-x64 package.
import {getLlama, LlamaLogLevel} from "node-llama-cpp";

// temperature 1 and no top-k / top-p / min-p cut: the model's own softmax
const FULL_DISTRIBUTION = {temperature: 1, topK: 0, topP: 1, minP: 0};

async function readStdin() {
    const chunks = [];
    for await (const chunk of process.stdin) chunks.push(chunk);
    return JSON.parse(Buffer.concat(chunks).toString("utf8"));
}

function logSoftmaxAt(probabilities, token) {
    const p = probabilities.get(token);
    return p === undefined || p <= 0 ? -Infinity : Math.log(p);
}

async function runJob(llama, job) {
    const model = await llama.loadModel({modelPath: job.model, gpuLayers: 0, useMmap: false});
    const out = {
        bos: model.tokens.bos ?? null,
        eos: model.tokens.eos ?? null,
        add_bos: model.tokens.shouldPrependBosToken,
    };
    out.tokenize = (job.tokenize ?? []).map((text) => Array.from(model.tokenize(text, false)));
    out.tokenize_special = (job.tokenize_special ?? []).map((text) => Array.from(model.tokenize(text, true)));
    out.detokenize = (job.detokenize ?? []).map((ids) => model.detokenize(ids, false));
    const needContext = (job.greedy ?? []).length + (job.logprobs ?? []).length > 0;
    if (needContext) {
        const context = await model.createContext({contextSize: job.context_size ?? 512, sequences: 1, threads: 1});
        const sequence = context.getSequence();
        out.greedy = [];
        for (const {ids, n} of job.greedy ?? []) {
            await sequence.clearHistory();
            const produced = [];
            for await (const token of sequence.evaluate(ids, {temperature: 0})) {
                produced.push(token);
                if (produced.length >= n) break;
            }
            out.greedy.push(produced);
        }
        out.logprobs = [];
        for (const ids of job.logprobs ?? []) {
            await sequence.clearHistory();
            const input = ids.slice(0, -1).map((token) => [token, {generateNext: {probabilities: true, options: FULL_DISTRIBUTION}}]);
            const results = await sequence.controlledEvaluate(input);
            out.logprobs.push(results.map((result, i) => logSoftmaxAt(result.next.probabilities, ids[i + 1])));
        }
        await context.dispose();
    }
    await model.dispose();
    return out;
}

const request = await readStdin();
const llama = await getLlama({
    gpu: false,
    build: "never",
    usePrebuiltBinaries: true,
    progressLogs: false,
    logLevel: LlamaLogLevel.error,
    vramPadding: 0,
});
const results = [];
for (const job of request.jobs) results.push(await runJob(llama, job));
process.stdout.write(JSON.stringify({results}, (key, value) => (value === -Infinity ? null : value)));
await llama.dispose();
