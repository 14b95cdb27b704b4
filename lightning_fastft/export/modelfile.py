"""An Ollama ``Modelfile`` beside an exported GGUF: ``FROM``, the chat template, stop tokens, parameters.

Ollama's templates are Go templates, the HF chat template is Jinja. The Go template is built from
what the Jinja template renders: probe conversations with marker contents give the text before and
after each role's content, the conversation start and the generation prompt; the Go template
repeats those pieces per message. It is used only if re-assembling the pieces reproduces the Jinja
rendering of a probe conversation (system, user, assistant, user, generation prompt) exactly; a
template that does something else (a default system prompt, merging the system message into the
first user turn, ...) raises :class:`NotImplementedError` naming the mismatch. A leading BOS text is
left out when the tokenizer adds BOS itself (llama.cpp / Ollama add it from the GGUF flag).

Stop tokens: the EOS token, every EOS id of the generation config, and the assistant turn's end
marker when it is a special token. Parameters: the generation config's ``temperature`` /
``top_p`` / ``top_k`` when it samples (``do_sample=True``), else ``temperature 0`` (greedy, as
``model.generate`` does by default).
"""

from __future__ import annotations

from dataclasses import dataclass

from jinja2.exceptions import TemplateError

from lightning_fastft.export.gguf_tokenizer import add_special_flags

_SYSTEM, _USER, _USER_2, _ASSISTANT = "\x01SYSTEM\x01", "\x01USER\x01", "\x01USER-2\x01", "\x01ASSISTANT\x01"


@dataclass(frozen=True)
class ChatPieces:
    """The literal text around each role's content in a chat template's rendering."""

    start: str
    user: tuple[str, str]
    assistant: tuple[str, str]
    system: tuple[str, str] | None
    generation: str

    def render(self, messages: list[dict], add_generation_prompt: bool) -> str:
        """The conversation as the Go template built from these pieces renders it."""
        out = [self.start]
        for message in messages:
            before, after = getattr(self, message["role"])
            out += [before, message["content"], after]
        if add_generation_prompt:
            out.append(self.generation)
        return "".join(out)

    def go_template(self) -> str:
        """The Ollama ``TEMPLATE``: one line, no whitespace trimming (the pieces keep their newlines)."""
        for piece in (self.start, self.generation, *self.user, *self.assistant, *(self.system or ())):
            if "{{" in piece or '"""' in piece:
                raise NotImplementedError(f"Modelfile: chat template text {piece!r} cannot be quoted in a Go template")
        branches = [("user", self.user), ("assistant", self.assistant)]
        if self.system is not None:
            branches.insert(0, ("system", self.system))
        body = "".join(
            f'{"{{ if" if i == 0 else "{{ else if"} eq .Role "{role}" }}}}{before}{{{{ .Content }}}}{after}'
            for i, (role, (before, after)) in enumerate(branches)
        )
        last = '{{ if and (eq (len (slice $.Messages $i)) 1) (ne .Role "assistant") }}' + self.generation + "{{ end }}"
        return f"{self.start}{{{{ range $i, $_ := .Messages }}}}{body}{{{{ end }}}}{last}{{{{ end }}}}"


def _between(text: str, left: str, right: str) -> str:
    return text[text.index(left) + len(left) : text.index(right)]


def chat_pieces(tokenizer, strip_bos: bool) -> ChatPieces:
    """The pieces of ``tokenizer.chat_template``, checked by re-rendering a probe conversation."""
    try:
        return _chat_pieces(tokenizer, strip_bos)
    except ValueError as error:  # a marker missing where fixed text around messages would put it
        raise NotImplementedError(
            f"Modelfile: the chat template does not render as fixed text around each message ({error}); "
            "write the TEMPLATE by hand"
        ) from error


def _chat_pieces(tokenizer, strip_bos: bool) -> ChatPieces:
    def render(messages, add_generation_prompt=False):
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)

    user, user_2 = {"role": "user", "content": _USER}, {"role": "user", "content": _USER_2}
    assistant = {"role": "assistant", "content": _ASSISTANT}
    one = render([user])  # start, user before, U, user after
    two = render([user, assistant])  # ... then assistant before, A, assistant after
    three = render([user, assistant, user_2])  # ... then user before, U2, user after
    user_after = three[three.index(_USER_2) + len(_USER_2) :]
    assistant_after = two[two.index(_ASSISTANT) + len(_ASSISTANT) :]
    user_before = _between(three, _ASSISTANT, _USER_2)[len(assistant_after) :]
    assistant_before = _between(two, _USER, _ASSISTANT)[len(user_after) :]
    start = one[: one.index(_USER) - len(user_before)]
    generation = render([user], add_generation_prompt=True)[len(one) :]
    try:
        with_system = render([{"role": "system", "content": _SYSTEM}, user])
    except TemplateError:  # templates that refuse a system message (Gemma's raise)
        with_system = None
    if with_system is None or _SYSTEM not in with_system:  # refused or dropped: Ollama drops it too
        system = None
    else:
        system_after = _between(with_system, _SYSTEM, _USER)
        system = (
            with_system[len(start) : with_system.index(_SYSTEM)],
            system_after[: len(system_after) - len(user_before)],
        )
    bos = getattr(tokenizer, "bos_token", None)
    pieces = ChatPieces(start, (user_before, user_after), (assistant_before, assistant_after), system, generation)
    probe = ([{"role": "system", "content": _SYSTEM}] if system else []) + [user, assistant, user_2]
    expected = render(probe, add_generation_prompt=True)
    if pieces.render(probe, True) != expected:
        raise ValueError(f"probe rendering {expected!r}, re-assembled from the pieces {pieces.render(probe, True)!r}")
    if strip_bos and bos and start.startswith(bos):
        pieces = ChatPieces(start[len(bos) :], pieces.user, pieces.assistant, pieces.system, pieces.generation)
    return pieces


def _quote(value: str) -> str:
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'


def modelfile_text(gguf_name: str, tokenizer, generation_config) -> str:
    """The Modelfile for the GGUF file ``gguf_name`` (relative to the Modelfile)."""
    lines = [f"FROM ./{gguf_name}"]
    stops: list[str] = []
    if tokenizer is not None:
        add_bos, _ = add_special_flags(tokenizer)
        if isinstance(getattr(tokenizer, "chat_template", None), str):
            pieces = chat_pieces(tokenizer, strip_bos=add_bos)
            lines.append(f'TEMPLATE """{pieces.go_template()}"""')
            end_marker = pieces.assistant[1].strip()
            if end_marker and end_marker in {str(t) for t in tokenizer.all_special_tokens}:
                stops.append(end_marker)
        else:
            lines.append('TEMPLATE """{{ .Prompt }}"""')
        eos_ids = getattr(generation_config, "eos_token_id", None)
        eos_ids = [eos_ids] if isinstance(eos_ids, int) else list(eos_ids or [])
        for token_id in [tokenizer.eos_token_id, *eos_ids]:
            if token_id is not None:
                stops.append(tokenizer.convert_ids_to_tokens(token_id))
    for stop in dict.fromkeys(stops):  # ordered, without repeats
        lines.append(f"PARAMETER stop {_quote(stop)}")
    if generation_config is not None and getattr(generation_config, "do_sample", False):
        for name in ("temperature", "top_p", "top_k"):
            value = getattr(generation_config, name, None)
            if value is not None:
                lines.append(f"PARAMETER {name} {value}")
    else:
        lines.append("PARAMETER temperature 0")
    return "\n".join(lines) + "\n"
