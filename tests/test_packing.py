"""sft.packing / dpo.packing: best-fit-decreasing rows whose every example keeps its unpacked loss
(DPO: every pair its log-ratio) within fp32 rounding, addressed like any data (resume, skips, dp)."""
import types

import pytest
import torch

from data_pipeline.packing import PackedPreferenceData, PackedSFTData
from data_pipeline.preference import PreferenceData
from data_pipeline.sft import SFTData
from engine.model.decoder import LlamaModel, init_parameters, lm_loss
from stages.dpo import DPOTrainer, _pair_log_ratios
from tests.noise_floor import FACTOR
from tests.parity import parity_config

SEQ = 32  # the parity model's sequence: one shape for every forward here


def _examples(count: int, seed: int, longest: int = SEQ + 1) -> list:
    gen = torch.Generator().manual_seed(seed)
    examples = []
    for _ in range(count):
        n = int(torch.randint(3, longest + 1, (1,), generator=gen))
        prompt = int(torch.randint(1, n - 1, (1,), generator=gen))
        tokens = torch.randint(1, 128, (n,), generator=gen).tolist()
        examples.append((tokens, [0] * prompt + [1] * (n - prompt)))
    return examples


@pytest.fixture(scope="module")
def model():
    cfg = parity_config([], 1, 1)
    torch.manual_seed(0)
    model = LlamaModel(cfg.model)
    init_parameters(model, cfg.seed)
    return model


def _token_losses(model, microbatch, dtype):
    """Per-target losses [rows, s] of a microbatch under `model` cast to `dtype`."""
    m = model.to(dtype)
    inputs, targets = microbatch.tokens[:, :-1], microbatch.tokens[:, 1:]
    with torch.no_grad():
        logits = m(inputs, positions=microbatch.positions, documents=microbatch.document_ids)
    losses = torch.nn.functional.cross_entropy(logits.double().flatten(0, 1), targets.reshape(-1), reduction="none")
    model.float()
    return losses.view(targets.shape) * microbatch.loss_mask.double()


def _unpacked_example_losses(model, data: SFTData, rows: int, dtype) -> dict:
    """{example index: its loss sum} from the padded samples 0..rows-1 (one example each)."""
    ids = {id(e): i for i, e in enumerate(data.examples)}
    mb = data.microbatch(0, 0, 0, 1)
    losses = _token_losses(model, mb, dtype).sum(1)
    return {ids[id(data._example(p))]: float(losses[p]) for p in range(rows)}


def test_packed_sft_examples_keep_their_unpacked_loss(model):
    examples = _examples(24, seed=1, longest=14)  # short: ~4 per row of 33 tokens
    n = len(examples)
    unpacked = SFTData(examples, SEQ, seed=3, global_batch_size=n, micro_batch_size=n, pad_id=0)
    packed = PackedSFTData(examples, SEQ, seed=3, global_batch_size=4, micro_batch_size=4, pad_id=0)
    rows = packed.rows.rows_per_epoch
    assert rows < n / 2, rows  # several examples per row
    fp32, fp64 = (_unpacked_example_losses(model, unpacked, n, dt) for dt in (torch.float32, torch.float64))
    floor = max(abs(fp32[i] - fp64[i]) for i in range(n))  # fp32 rounding of the unpacked computation itself
    tolerance = FACTOR * floor
    seen, worst = [], 0.0
    for step in range(-(-rows // 4)):
        mb = packed.microbatch(step, 0, 0, 1)
        losses = _token_losses(model, mb, torch.float32)
        for r in range(4):
            position = step * 4 + r
            if position >= rows:
                break
            for d, example in enumerate(packed.rows.row_items(position)):
                value = float((losses[r] * (mb.document_ids[r] == d)).sum())
                worst = max(worst, abs(value - fp32[example]))
                seen.append(example)
    print(f"packed SFT: {n} examples in {rows} rows; max |packed - unpacked| loss {worst:.2e}, "
          f"fp32 floor {floor:.2e}, tolerance {tolerance:.2e} ({FACTOR} x floor)")
    assert sorted(seen) == list(range(n))  # an epoch's rows hold every example once
    assert worst <= tolerance


def test_packed_rows_follow_position_skips_and_dp():
    examples = _examples(40, seed=2, longest=12)
    data = PackedSFTData(examples, SEQ, seed=5, global_batch_size=4, micro_batch_size=2, pad_id=0)
    one = [data.microbatch(3, j, 0, 1) for j in range(2)]
    two = [data.microbatch(3, 0, r, 2) for r in range(2)]
    for a, b in zip(one, two):  # the same global batch at dp=1 and dp=2, in Megatron's order
        assert all(torch.equal(x, y) for x, y in zip(a, b))
    skipped = data.microbatch(2, 0, 0, 1, skip_steps=[2])
    assert torch.equal(skipped.tokens, data.microbatch(3, 0, 0, 1).tokens)  # step 2 trains batch 3
    again = PackedSFTData(examples, SEQ, seed=5, global_batch_size=4, micro_batch_size=2, pad_id=0)
    assert torch.equal(again.microbatch(7, 1, 0, 1).tokens, data.microbatch(7, 1, 0, 1).tokens)  # a resumed run
    rows = data.rows.rows_per_epoch
    assert data.rows.row_items(0) != data.rows.row_items(rows) or data.rows.row_items(1) != data.rows.row_items(rows + 1)
    mb = data.microbatch(0, 0, 0, 1)
    assert mb.positions[0, 0] == 0 and int(mb.document_ids[0].max()) >= 1
    assert 0 <= data.rows.padding_fraction() < 0.3


def _sequence_logps(model, microbatch, dtype, packed):
    stub = types.SimpleNamespace(loss_fn=lambda logits, targets, mask: lm_loss(logits, targets, 0.0, mask),
                                 cp=types.SimpleNamespace(rank=0, size=1))  # one rank: no context parallelism
    m = model.to(dtype)
    inputs, targets = microbatch.tokens[:, :-1], microbatch.tokens[:, 1:]
    with torch.no_grad():
        out = DPOTrainer.sequence_logps(stub, m, inputs, targets, microbatch.positions, microbatch.loss_mask,
                                        microbatch.document_ids if packed else None)
    model.float()
    return out.double()


def test_packed_dpo_pairs_keep_their_unpacked_log_ratios(model):
    cfg = parity_config([], 1, 1)
    reference = LlamaModel(cfg.model)
    init_parameters(reference, cfg.seed + 1)  # a reference unlike the policy: log-ratios are not 0
    chosen, rejected = _examples(12, seed=4, longest=10), _examples(12, seed=5, longest=10)
    n = len(chosen)
    unpacked = PreferenceData(chosen, rejected, SEQ, seed=1, global_batch_size=n, micro_batch_size=n, pad_id=0)
    packed = PackedPreferenceData(chosen, rejected, SEQ, seed=1, global_batch_size=2, micro_batch_size=2, pad_id=0)
    mb = unpacked.microbatch(0, 0, 0, 1)
    ratios = {dt: _pair_log_ratios(_sequence_logps(model, mb, dt, False), _sequence_logps(reference, mb, dt, False),
                                   False) for dt in (torch.float32, torch.float64)}
    order = unpacked.sides[0]._perms[0].tolist()  # sample p is pair order[p]
    by_pair = {order[p]: float(ratios[torch.float32][p]) for p in range(n)}
    floor = float((ratios[torch.float32] - ratios[torch.float64]).abs().max())
    tolerance = FACTOR * floor
    rows, worst, seen = packed.rows.rows_per_epoch, 0.0, []
    for step in range(-(-rows // 2)):
        mb = packed.microbatch(step, 0, 0, 1)
        got = _pair_log_ratios(_sequence_logps(model, mb, torch.float32, True),
                               _sequence_logps(reference, mb, torch.float32, True), True)
        pairs = [p for r in range(2) if step * 2 + r < rows for p in packed.rows.row_items(step * 2 + r)]
        for k, pair in enumerate(pairs):
            worst = max(worst, abs(float(got[k]) - by_pair[pair]))
            seen.append(pair)
    print(f"packed DPO: {n} pairs in {rows} rows; max |packed - unpacked| log-ratio {worst:.2e}, "
          f"fp32 floor {floor:.2e}, tolerance {tolerance:.2e}")
    assert sorted(seen) == list(range(n)) and rows < n
    assert worst <= tolerance


def test_pairs_longer_than_a_row_are_left_out_with_a_note():
    long = ([1] * 20, [0] * 5 + [1] * 15)
    data = PackedPreferenceData([long, ([1] * 4, [0, 1, 1, 1])], [long, ([2] * 4, [0, 1, 1, 1])], SEQ, 1, 1, 1, 0)
    assert data.rows.rows_per_epoch == 1 and "left out 1 of 2 pairs" in data.notes[0]


# --- packed DPO in its layouts (DPO runs at tp, cp and dp; pp is refused for every DPO run) ---

DPO_PACKED = ["dpo.inputs=[pairs]", "dpo.beta=0.5", "dpo.packing=true", "optim.lr=1e-3", "optim.eps=1e-4",
              "train.micro_batch_size=1", "train.global_batch_size=4"]
DPO_STEPS = 4


def _packed_pairs(cfg):
    """Pairs whose chosen side repeats its prompt's pattern and whose rejected side is noise."""
    gen = torch.Generator().manual_seed(11)
    chosen, rejected = [], []
    for _ in range(40):
        prompt = torch.randint(1, 16, (int(torch.randint(2, 5, (1,), generator=gen)),), generator=gen).tolist()
        n = int(torch.randint(3, 9, (1,), generator=gen))
        good, bad = (prompt * 9)[:n], torch.randint(16, 128, (n,), generator=gen).tolist()
        chosen.append((prompt + good, [0] * len(prompt) + [1] * n))
        rejected.append((prompt + bad, [0] * len(prompt) + [1] * n))
    t = cfg.train
    return PackedPreferenceData(chosen, rejected, cfg.model.seq_length, cfg.seed, t.global_batch_size,
                                t.micro_batch_size, pad_id=0)


def _train_packed_dpo(overrides, world_size, reordered=None):
    from engine.model.parallelize import gather_full_state_dict
    from parallel.topology import ParallelContext
    from tests.noise_floor import Reordered

    cfg = parity_config([*DPO_PACKED, *overrides], world_size, DPO_STEPS, stage="dpo")
    ctx = ParallelContext.single() if world_size == 1 else ParallelContext.create(cfg.parallel)
    trainer = DPOTrainer(cfg, ctx, _packed_pairs(cfg))
    floor = Reordered(trainer, reordered) if reordered else None
    losses = [trainer.train_step(s, floor.microbatches(s, trainer.microbatches(s)) if floor else None).loss
              for s in range(DPO_STEPS)]
    state = gather_full_state_dict(trainer.chunks, ctx)
    state = floor.state(state) if floor else state
    return losses, ({k: v.numpy() for k, v in state.items()} if ctx.rank == 0 else None)


def _packed_dpo_worker(rank, world_size, layouts):
    return [_train_packed_dpo(layout, world_size) for layout in layouts]


def _as_torch(run):
    return run[0], {k: torch.from_numpy(v) for k, v in run[1].items()}


@pytest.mark.distributed
def test_packed_dpo_layouts_match_the_single_rank_run():
    from tests.distributed import run_distributed
    from tests.noise_floor import Tolerance

    reference = _as_torch(_train_packed_dpo([], 1))
    assert reference[0][0] == pytest.approx(0.6931471805599453, rel=1e-6)  # policy == reference: log 2
    layouts = {"dp2": ["parallel.dp=2"], "tp2": ["parallel.tp=2"], "cp2": ["parallel.cp=2"]}
    runs = run_distributed(_packed_dpo_worker, 2, list(layouts.values()), timeout=300)[0]
    for (name, _), run, scope in zip(layouts.items(), runs, ("microbatches", "all", "all")):
        tolerance = Tolerance.measured(reference, _as_torch(_train_packed_dpo([], 1, reordered=scope)))
        tolerance.check(f"packed dpo {name}", *_as_torch(run), *reference)


def test_packed_epochs_count_rows_and_cp_is_accepted(tmp_path, capsys):
    import json

    from engine.config import ConfigError
    from stages.registry import builtin_stages

    path = tmp_path / "x.jsonl"
    path.write_text("".join(json.dumps({"prompt": f"q{i}", "response": "yes"}) + "\n" for i in range(10)))
    registry = builtin_stages()
    sft = registry.get("sft")
    cfg = registry.load_config(sft, None, [f"sft.inputs=[{path}]", "sft.packing=true", "train.global_batch_size=1",
                                           "model.seq_length=64"])
    sft.prepare(cfg, None, "auto")
    rows = sft.build_data(cfg).rows.rows_per_epoch
    assert rows < 10 and cfg.train.steps == 3 * rows  # 3 epochs of packed rows, not of examples
    assert f"over 10 examples ({rows} packed samples)" in capsys.readouterr().err
    # Packed rows under context parallelism: their document masks cross the zigzag split (ring
    # attention masks its blocks; tests/test_parity_documents.py's cp2 run of such rows).
    cfg = registry.load_config(sft, None, [f"sft.inputs=[{path}]", "sft.packing=true", "parallel.cp=2"])
    sft.validate(cfg, 2)
    cfg = registry.load_config(sft, None, [f"sft.inputs=[{path}]", "sft.lora_rank=-1", "parallel.cp=2"])
    with pytest.raises(ConfigError, match="sft.lora_rank=-1: must be >= 0"):
        sft.validate(cfg, 2)
