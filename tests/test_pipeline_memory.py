"""A pipeline stage frees each output's data once its send completed (Megatron's deallocate_output_tensor).

One stage of a pipeline runs its real schedule in this process, on the first model chunk of the
parity model, with `batch_isend_irecv` replaced by a stand-in that fills every received gradient
from a fixed generator. With and without freeing:
- the parameters' gradients are bitwise equal (backward runs through the gradient edge taken at
  forward, not through the freed tensor);
- the peak of live activation bytes (distinct storages of the tensors autograd saved, plus the
  stage outputs held for backward, sampled at every forward and backward) drops by the outputs
  sent and not yet run backward: (max in flight - 1) outputs, since the newest is still unsent
  when its forward ends.
Outputs whose autograd node keeps them (an exp-like last op, a view) are never freed.
"""
import weakref

import pytest
import torch

import parallel.pipeline as pipeline
from engine.config import load_config
from engine.model.decoder import LlamaModel, init_parameters
from parallel.collectives import RECV, CommLedger, Group
from tests.parity import PARITY_OVERRIDES, TINY_CONFIG


def _fill_receives(ops, group):
    for op in ops:
        if op.kind == RECV:
            gen = torch.Generator().manual_seed(op.tensor.numel() + len(_fill_receives.seen))
            op.tensor.copy_(torch.randn(op.tensor.shape, generator=gen, dtype=op.tensor.dtype))
            _fill_receives.seen.append(1)
    return []


def _run_first_stage(pp: int, m: int, free: bool, monkeypatch):
    """Stage 0 of pp stages over m microbatches: (parameter grads, peak live bytes, output bytes, in flight)."""
    cfg = load_config(TINY_CONFIG, list(PARITY_OVERRIDES)).model
    model = LlamaModel(cfg, [0], pre_process=True, post_process=False)
    init_parameters(model, seed=1)
    b, s = 2, cfg.seq_length
    _fill_receives.seen = []
    monkeypatch.setattr(pipeline, "batch_isend_irecv", _fill_receives)
    comm = pipeline.StageComm(Group("pp", None, pp, 0, CommLedger()), 1, (b, s, cfg.hidden_size), torch.float32, "cpu")
    live: list = []  # weak references to everything autograd saved and to the stage outputs
    peak = [0]

    def sample() -> None:
        storages = {}
        for ref in live:
            tensor = ref()
            if tensor is not None:
                storage = tensor.untyped_storage()
                storages[storage.data_ptr()] = storage.nbytes()
        peak[0] = max(peak[0], sum(storages.values()))

    def pack(tensor):
        live.append(weakref.ref(tensor))
        return tensor

    def forward_step(chunk, j, stage_input):
        tokens = torch.randint(0, cfg.vocab_size, (b, s), generator=torch.Generator().manual_seed(j))
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
            output = model(tokens)
        live.append(weakref.ref(output))
        sample()
        return output

    order = pipeline.schedule_order(pp, 0, m)
    pipeline.run_schedule(order, comm, forward_step, lambda chunk, j: sample(), free_sent_outputs=free)
    grads = {name: p.grad.clone() for name, p in model.named_parameters()}
    return grads, peak[0], b * s * cfg.hidden_size * 4, pipeline.max_in_flight(order)


@pytest.mark.parametrize("pp,m", [(4, 8), (2, 4)])
def test_freeing_sent_outputs_keeps_gradients_and_lowers_the_activation_peak(pp, m, monkeypatch):
    kept_grads, kept_peak, output_bytes, in_flight = _run_first_stage(pp, m, False, monkeypatch)
    freed_grads, freed_peak, _, _ = _run_first_stage(pp, m, True, monkeypatch)
    assert kept_grads.keys() == freed_grads.keys()
    assert all(torch.equal(kept_grads[name], freed_grads[name]) for name in kept_grads)
    assert any(g.abs().sum() > 0 for g in kept_grads.values())
    drop = kept_peak - freed_peak
    print(f"pp={pp} m={m}: peak live activation bytes {kept_peak} kept, {freed_peak} freed "
          f"(drop {drop} = {drop / output_bytes:.3f} outputs of {output_bytes} bytes, {in_flight} in flight)")
    # Each freed output leaves a 1-element placeholder (4 bytes) behind.
    assert (in_flight - 1) * (output_bytes - 4) <= drop <= (in_flight - 1) * output_bytes


def test_outputs_that_autograd_keeps_are_not_freed():
    x = torch.randn(3, 4, requires_grad=True)
    exp_like = torch.exp(x)  # ExpBackward saves its result
    view = (x * 2)[1:]
    plain = x * 2 + 1
    assert not pipeline.release_sent_output(exp_like) and exp_like.shape == (3, 4)
    assert not pipeline.release_sent_output(view) and view.shape == (2, 4)
    assert pipeline.release_sent_output(plain) and plain.untyped_storage().nbytes() == 4
    torch.autograd.backward(torch.autograd.graph.get_gradient_edge(exp_like), torch.ones(3, 4))
    assert torch.allclose(x.grad, x.detach().exp())
