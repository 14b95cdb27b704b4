import warnings

import pytest
import torch
from helpers import assert_norm_relative_close
from transformers import LlamaConfig
from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding, apply_rotary_pos_emb
from transformers.models.phi3.modeling_phi3 import apply_rotary_pos_emb as apply_partial_rotary_pos_emb

from lightning_fastft import _runtime
from lightning_fastft.kernels import rope as rope_module
from lightning_fastft.kernels.rope import rope_qk_, rope_qk_reference

BATCH, SEQ, Q_HEADS, K_HEADS, HEAD_DIM = 3, 7, 4, 2, 16


def angle_table(positions: int, rotary_dim: int, device: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(positions, Dr) cos/sin with duplicated halves, as HF builds them."""
    inv_freq = 1.0 / 10000 ** (torch.arange(0, rotary_dim, 2, device=device).float() / rotary_dim)
    freqs = torch.arange(positions, device=device).float()[:, None] * inv_freq
    angles = torch.cat((freqs, freqs), dim=-1)
    return angles.cos(), angles.sin()


def packed_position_ids(batch: int, seq: int, device: str) -> torch.Tensor:
    """Positions that restart inside rows, as in packed sequences."""
    position_ids = torch.arange(seq, device=device).repeat(batch, 1)
    for row in range(batch):
        restart = int(torch.randint(1, seq, ()))
        position_ids[row, restart:] -= restart
    return position_ids


def projection_views(dtype, device, batch=BATCH, seq=SEQ, q_heads=Q_HEADS, k_heads=K_HEADS, head_dim=HEAD_DIM):
    """Leaf projections (B, S, H*D) and their (B, S, H, D) views (non-leaf, so rotatable in place)."""
    q_proj = torch.randn(batch, seq, q_heads * head_dim, device=device).to(dtype).requires_grad_()
    k_proj = torch.randn(batch, seq, k_heads * head_dim, device=device).to(dtype).requires_grad_()

    def views():
        return (q_proj * 1).view(batch, seq, q_heads, head_dim), (k_proj * 1).view(batch, seq, k_heads, head_dim)

    return (q_proj, k_proj), views


def grads_through(leaves, views, rotate, grad_q, grad_k):
    for leaf in leaves:
        leaf.grad = None
    q, k = views()
    q_out, k_out = rotate(q, k)
    ((q_out * grad_q).sum() + (k_out * grad_k).sum()).backward()
    return q_out.detach().clone(), k_out.detach().clone(), *(leaf.grad.clone() for leaf in leaves)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("head_dim", [16, 128])
def test_matches_hugging_face_llama(head_dim, dtype, device):
    config = LlamaConfig(hidden_size=Q_HEADS * head_dim, num_attention_heads=Q_HEADS, max_position_embeddings=64)
    rotary = LlamaRotaryEmbedding(config).to(device)
    position_ids = packed_position_ids(BATCH, SEQ, device)
    # HF layout (B, H, S, D); our op takes its (B, S, H, D) transpose view.
    q_hf = torch.randn(BATCH, Q_HEADS, SEQ, head_dim, device=device).to(dtype).requires_grad_()
    k_hf = torch.randn(BATCH, K_HEADS, SEQ, head_dim, device=device).to(dtype).requires_grad_()
    cos, sin = rotary(q_hf, position_ids)
    assert cos.dtype == dtype
    grad_q, grad_k = torch.randn_like(q_hf), torch.randn_like(k_hf)
    want_q, want_k = apply_rotary_pos_emb(q_hf, k_hf, cos, sin)
    ((want_q * grad_q).sum() + (want_k * grad_k).sum()).backward()

    q_leaf, k_leaf = q_hf.detach().clone().requires_grad_(), k_hf.detach().clone().requires_grad_()
    q, k = (q_leaf * 1).transpose(1, 2), (k_leaf * 1).transpose(1, 2)
    q_out, k_out = rope_qk_(q, k, cos, sin)
    ((q_out.transpose(1, 2) * grad_q).sum() + (k_out.transpose(1, 2) * grad_k).sum()).backward()
    assert_norm_relative_close(q_out.transpose(1, 2), want_q.detach(), dtype)
    assert_norm_relative_close(k_out.transpose(1, 2), want_k.detach(), dtype)
    assert_norm_relative_close(q_leaf.grad, q_hf.grad, dtype)
    assert_norm_relative_close(k_leaf.grad, k_hf.grad, dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_partial_rotary_matches_hugging_face_phi3(dtype, device):
    rotary_dim = HEAD_DIM // 2
    table_cos, table_sin = angle_table(SEQ, rotary_dim, device)
    cos, sin = table_cos[None].to(dtype), table_sin[None].to(dtype)
    q_hf = torch.randn(BATCH, Q_HEADS, SEQ, HEAD_DIM, device=device).to(dtype)
    k_hf = torch.randn(BATCH, K_HEADS, SEQ, HEAD_DIM, device=device).to(dtype)
    want_q, want_k = apply_partial_rotary_pos_emb(q_hf, k_hf, cos, sin)
    q, k = q_hf.transpose(1, 2).clone(), k_hf.transpose(1, 2).clone()
    rope_qk_(q, k, cos, sin)
    assert_norm_relative_close(q.transpose(1, 2), want_q, dtype)
    assert_norm_relative_close(k.transpose(1, 2), want_k, dtype)
    assert torch.equal(q[..., rotary_dim:], q_hf.transpose(1, 2)[..., rotary_dim:])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("angles", ["per_token", "broadcast_batch", "table_position_ids", "table_prefix"])
@pytest.mark.parametrize("rotary_dim", [HEAD_DIM, 6])
def test_forward_backward_match_reference(rotary_dim, angles, dtype, device):
    table_cos, table_sin = angle_table(2 * SEQ, rotary_dim, device)
    position_ids = None
    if angles == "per_token":
        ids = packed_position_ids(BATCH, SEQ, device)
        cos, sin = table_cos[ids].to(dtype), table_sin[ids].to(dtype)
    elif angles == "broadcast_batch":
        cos, sin = table_cos[None, 3 : 3 + SEQ], table_sin[None, 3 : 3 + SEQ]
    elif angles == "table_position_ids":
        cos, sin, position_ids = table_cos, table_sin, packed_position_ids(BATCH, SEQ, device)
    else:
        cos, sin = table_cos, table_sin
    leaves, views = projection_views(dtype, device)
    grad_q = torch.randn(BATCH, SEQ, Q_HEADS, HEAD_DIM, device=device).to(dtype)
    grad_k = torch.randn(BATCH, SEQ, K_HEADS, HEAD_DIM, device=device).to(dtype)
    got = grads_through(leaves, views, lambda q, k: rope_qk_(q, k, cos, sin, position_ids), grad_q, grad_k)
    want = grads_through(
        leaves, views, lambda q, k: rope_qk_reference(q, k, cos, sin, position_ids), grad_q, grad_k
    )
    for actual, expected in zip(got, want):
        assert_norm_relative_close(actual, expected, dtype)


def test_rotates_in_place_and_bumps_version(device):
    table_cos, table_sin = angle_table(SEQ, HEAD_DIM, device)
    q = torch.randn(BATCH, SEQ, Q_HEADS, HEAD_DIM, device=device)
    k = torch.randn(BATCH, SEQ, K_HEADS, HEAD_DIM, device=device)
    want_q, want_k = rope_qk_reference(q, k, table_cos, table_sin)
    pointers, versions = (q.data_ptr(), k.data_ptr()), (q._version, k._version)
    q_out, k_out = rope_qk_(q, k, table_cos, table_sin)
    assert q_out is q and k_out is k
    assert (q.data_ptr(), k.data_ptr()) == pointers
    assert q._version > versions[0] and k._version > versions[1]
    assert_norm_relative_close(q, want_q, torch.float32)
    assert_norm_relative_close(k, want_k, torch.float32)


def _backward_node_names(tensor: torch.Tensor) -> set[str]:
    names, stack, seen = set(), [tensor.grad_fn], set()
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        names.add(type(node).__name__)
        stack.extend(next_node for next_node, _ in node.next_functions)
    return names


@pytest.mark.parametrize("layout", ["projection_view", "heads_first_transpose"])
def test_returned_views_avoid_as_strided_backward(layout, device):
    """The returned q/k are view/permute of the rotated roots, not as_strided rebuilds."""
    table_cos, table_sin = angle_table(SEQ, HEAD_DIM, device)
    q_leaf = torch.randn(BATCH, SEQ, Q_HEADS * HEAD_DIM, device=device, requires_grad=True)
    q = (q_leaf * 1).view(BATCH, SEQ, Q_HEADS, HEAD_DIM)
    if layout == "heads_first_transpose":
        k_leaf = torch.randn(BATCH, K_HEADS, SEQ, HEAD_DIM, device=device, requires_grad=True)
        k = (k_leaf * 1).transpose(1, 2)
    else:
        k_leaf = torch.randn(BATCH, SEQ, K_HEADS * HEAD_DIM, device=device, requires_grad=True)
        k = (k_leaf * 1).view(BATCH, SEQ, K_HEADS, HEAD_DIM)
    want_q, want_k = rope_qk_reference(q.detach(), k.detach(), table_cos, table_sin)
    q_out, k_out = rope_qk_(q, k, table_cos, table_sin)
    names = _backward_node_names(q_out) | _backward_node_names(k_out)
    assert not any("AsStrided" in name for name in names), names
    assert_norm_relative_close(q_out.detach(), want_q, torch.float32)
    assert_norm_relative_close(k_out.detach(), want_k, torch.float32)
    grad_q, grad_k = torch.randn_like(q_out), torch.randn_like(k_out)
    ((q_out * grad_q).sum() + (k_out * grad_k).sum()).backward()
    want_grad_q, want_grad_k = rope_qk_reference(grad_q, grad_k, table_cos, -table_sin)  # inverse rotation
    assert_norm_relative_close(q_leaf.grad.view_as(want_grad_q), want_grad_q, torch.float32)
    if layout == "heads_first_transpose":
        want_grad_k = want_grad_k.transpose(1, 2)
    assert_norm_relative_close(k_leaf.grad.view_as(want_grad_k), want_grad_k, torch.float32)


def test_fused_qkv_views_share_one_root(device):
    """q and k as head slices of one QKV projection: v's gradient passes through untouched."""
    table_cos, table_sin = angle_table(SEQ, HEAD_DIM, device)
    width = (Q_HEADS + 2 * K_HEADS) * HEAD_DIM
    qkv = torch.randn(BATCH, SEQ, width, device=device, requires_grad=True)
    grads = [torch.randn(BATCH, SEQ, heads, HEAD_DIM, device=device) for heads in (Q_HEADS, K_HEADS, K_HEADS)]

    def run(rotate):
        qkv.grad = None
        fused = (qkv * 1).unflatten(-1, (-1, HEAD_DIM))  # sliced by indexing: split's views can't be dirtied
        q, k, v = fused[:, :, :Q_HEADS], fused[:, :, Q_HEADS : Q_HEADS + K_HEADS], fused[:, :, Q_HEADS + K_HEADS :]
        q, k = rotate(q, k)
        sum((t * g).sum() for t, g in zip((q, k, v), grads)).backward()
        return q.detach(), k.detach(), qkv.grad.clone()

    got = run(lambda q, k: rope_qk_(q, k, table_cos, table_sin))
    want = run(lambda q, k: rope_qk_reference(q, k, table_cos, table_sin))
    for actual, expected in zip(got, want):
        assert_norm_relative_close(actual, expected, torch.float32)


@pytest.mark.parametrize("loss", ["same_grad_tensor", "expanded_grad"])
def test_backward_with_aliased_or_expanded_grads(loss, device):
    """(q + k).sum() hands the very same gradient tensor for q and k; .sum() an expanded one."""
    table_cos, table_sin = angle_table(SEQ, HEAD_DIM, device)
    leaves, views = projection_views(torch.float32, device, k_heads=Q_HEADS)

    def run(rotate):
        for leaf in leaves:
            leaf.grad = None
        q, k = rotate(*views())
        (q + k).sum().backward() if loss == "same_grad_tensor" else (q.sum() + 2 * k.sum()).backward()
        return [leaf.grad.clone() for leaf in leaves]

    got = run(lambda q, k: rope_qk_(q, k, table_cos, table_sin))
    want = run(lambda q, k: rope_qk_reference(q, k, table_cos, table_sin))
    for actual, expected in zip(got, want):
        assert_norm_relative_close(actual, expected, torch.float32)


def test_long_indexing_path(device, monkeypatch):
    """Force the int64-offset variant of the kernel (normally only for >= 2**31 elements)."""
    monkeypatch.setattr(rope_module, "_INT32_LIMIT", 16)
    table_cos, table_sin = angle_table(2 * SEQ, HEAD_DIM, device)
    position_ids = packed_position_ids(BATCH, SEQ, device)
    leaves, views = projection_views(torch.float32, device)
    grad_q = torch.randn(BATCH, SEQ, Q_HEADS, HEAD_DIM, device=device)
    grad_k = torch.randn(BATCH, SEQ, K_HEADS, HEAD_DIM, device=device)
    got = grads_through(leaves, views, lambda q, k: rope_qk_(q, k, table_cos, table_sin, position_ids), grad_q, grad_k)
    want = grads_through(
        leaves, views, lambda q, k: rope_qk_reference(q, k, table_cos, table_sin, position_ids), grad_q, grad_k
    )
    for actual, expected in zip(got, want):
        assert_norm_relative_close(actual, expected, torch.float32)


def test_rejects_layouts_it_cannot_rotate_in_place(device):
    table_cos, table_sin = angle_table(SEQ, HEAD_DIM, device)
    q = torch.randn(BATCH, SEQ, Q_HEADS, HEAD_DIM, device=device)
    k = torch.randn(BATCH, SEQ, K_HEADS, HEAD_DIM, device=device)
    with pytest.raises(ValueError, match="last"):
        rope_qk_(q.transpose(2, 3).contiguous().transpose(2, 3), k, table_cos, table_sin)
    with pytest.raises(ValueError, match="overlap"):
        rope_qk_(q, q[:, :, :K_HEADS], table_cos, table_sin)
    with pytest.raises(ValueError, match="overlap"):
        rope_qk_(q[:, :1].expand(BATCH, SEQ, Q_HEADS, HEAD_DIM), k, table_cos, table_sin)
    with pytest.raises(ValueError, match="rotary dim"):
        rope_qk_(q, k, *angle_table(SEQ, 2 * HEAD_DIM, device))
    with pytest.raises(ValueError, match="shorter"):
        rope_qk_(q, k, *angle_table(SEQ - 1, HEAD_DIM, device))


def test_fallback_matches_and_warns_once(device, monkeypatch):
    table_cos, table_sin = angle_table(2 * SEQ, HEAD_DIM, device)
    position_ids = packed_position_ids(BATCH, SEQ, device)
    leaves, views = projection_views(torch.float32, device)
    grad_q = torch.randn(BATCH, SEQ, Q_HEADS, HEAD_DIM, device=device)
    grad_k = torch.randn(BATCH, SEQ, K_HEADS, HEAD_DIM, device=device)

    def rotate(q, k):
        pointers = (q.data_ptr(), k.data_ptr())
        q_out, k_out = rope_qk_(q, k, table_cos, table_sin, position_ids)
        assert (q_out.data_ptr(), k_out.data_ptr()) == (q.data_ptr(), k.data_ptr()) == pointers
        assert (q_out.shape, q_out.stride(), k_out.shape, k_out.stride()) == (q.shape, q.stride(), k.shape, k.stride())
        return q_out, k_out

    kernel = grads_through(leaves, views, rotate, grad_q, grad_k)
    monkeypatch.setattr(rope_module, "triton_enabled", lambda *tensors: False)
    monkeypatch.setattr(_runtime, "_warned", set())
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        fallback = grads_through(leaves, views, rotate, grad_q, grad_k)
        grads_through(leaves, views, rotate, grad_q, grad_k)
    assert [str(w.message).count("rope_qk_") for w in caught] == [1]
    for actual, expected in zip(fallback, kernel):
        assert_norm_relative_close(actual, expected, torch.float32)
