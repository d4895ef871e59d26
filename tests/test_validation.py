"""Validation during training (engine/eval/validation.py): the validation split is megatron-core's,
a run is bitwise the same with and without validation passes, the console / metrics.jsonl /
TensorBoard records, the stage hooks, bad settings, and every layout's validation loss equals the
single-rank one (tolerance from the measured rounding spread of single-rank passes)."""
import copy
import json
import warnings

import numpy as np
import pytest
import torch

from data_pipeline.gpt_dataset import GPTDataset, split_documents
from data_pipeline.loader import TrainingData
from engine.train.synthetic_data import SyntheticData
from tests.parity import parity_config
from tests.test_data_gpt_dataset import _megatron, _write

LAYOUTS = {"tp2": ["parallel.tp=2"], "tp2_sp": ["parallel.tp=2", "parallel.sequence_parallel=true"],
           "pp2": ["parallel.pp=2"], "cp2": ["parallel.cp=2"], "dp2": [], "zero1": ["parallel.zero=1"],
           "zero3": ["parallel.zero=3"]}
STEPS = 4


def _megatron_splits(prefixes, weights, seq_length, seed, sizes, split):
    from megatron.core.datasets.blended_megatron_dataset_builder import BlendedMegatronDatasetBuilder
    from megatron.core.datasets.gpt_dataset import GPTDataset as MegatronGPTDataset
    from megatron.core.datasets.gpt_dataset import GPTDatasetConfig
    from tests.test_data_gpt_dataset import _ByteTokenizerStub

    config = GPTDatasetConfig(random_seed=seed, sequence_length=seq_length, blend=(prefixes, weights), split=split,
                              tokenizer=_ByteTokenizerStub(), reset_position_ids=False, reset_attention_mask=False,
                              eod_mask_loss=False, path_to_cache=None, mmap_bin_files=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return BlendedMegatronDatasetBuilder(MegatronGPTDataset, sizes, lambda: True, config).build()


@pytest.mark.parametrize("split", ["969,30,1", "90,7,3", "8,2"])
def test_validation_split_is_megatron_cores_documents_in_its_order(tmp_path, split):
    prefix = _write(str(tmp_path / "d"), seed=4, documents=150)
    # The test part asks for no samples: None (one epoch), as 0 makes megatron-core count epochs of an
    # empty part forever (it requests one extra token of a part of 969,30,1 that holds no tokens).
    _, valid, _ = _megatron_splits([prefix], None, 32, 11, [100, 40, None], split)
    ours = GPTDataset(prefix, 32, 40, 11, split=split, part=1)
    assert len(ours) == len(valid) and ours.document_index.min() == valid.document_index.min() > 0
    np.testing.assert_array_equal(ours.document_index, valid.document_index)
    for i in range(len(ours)):
        np.testing.assert_array_equal(ours[i], valid._query_document_sample_shuffle_indices(i)[0])
    train = set(split_documents(split, 150, 0).tolist())
    assert train.isdisjoint(ours.document_index.tolist())  # never trained on


def test_blended_validation_matches_megatrons_valid_blend(tmp_path):
    prefixes = [_write(str(tmp_path / f"d{i}"), seed=20 + i, documents=80 + 30 * i) for i in range(2)]
    gbs, iters, seq = 8, 5, 24
    _, theirs, _ = _megatron_splits(prefixes, [0.7, 0.3], seq, 5, [64, gbs * iters, 0], "90,10,0")
    ours = TrainingData(prefixes, seq, 5, gbs, 2, iters, weights=[0.7, 0.3], reserve_steps=0, split="90,10,0", part=1)
    np.testing.assert_array_equal(ours.dataset_index[:gbs * iters], theirs.dataset_index[:gbs * iters])
    for batch in range(iters):
        rows = np.concatenate([ours.microbatch(batch, j, 0, 1).tokens.numpy() for j in range(4)])
        for row in range(gbs):
            position = batch * gbs + row
            dataset = theirs.datasets[theirs.dataset_index[position]]
            expected = dataset._query_document_sample_shuffle_indices(int(theirs.dataset_sample_index[position]))[0]
            np.testing.assert_array_equal(rows[row], expected)


def _trainer(overrides, world_size=1, steps=STEPS, ctx=None, run_dir=None):
    from engine.train.trainer import Trainer
    from parallel.topology import ParallelContext

    cfg = parity_config(["train.eval_iters=2", "logging.tensorboard=false", *overrides], world_size, steps)
    ctx = ctx or (ParallelContext.single() if world_size == 1 else ParallelContext.create(cfg.parallel))
    trainer = Trainer(cfg, ctx, SyntheticData.for_config(cfg), run_dir=run_dir)
    trainer.validation_data = SyntheticData(cfg.seed + 1, cfg.model.vocab_size, cfg.model.seq_length,
                                            cfg.train.micro_batch_size, cfg.train.global_batch_size)
    return trainer


def _fit(overrides, world_size=1, run_dir=None):
    """(per-step losses, validation records, final weights) of a fit()."""
    from engine.model.parallelize import gather_full_state_dict

    trainer = _trainer(overrides, world_size, run_dir=run_dir)
    results = trainer.fit(0)
    state = gather_full_state_dict(trainer.chunks, trainer.ctx)
    validation = [{k: v for k, v in r.extra.items() if k.startswith("val_") and k != "val_time"} for r in results]
    return [r.loss for r in results], validation, {k: v.clone() for k, v in state.items()}


def test_validation_never_changes_the_training_curve_and_is_logged(tmp_path, capsys):
    plain_losses, plain_val, plain_state = _fit([])
    losses, validation, state = _fit(["train.eval_interval=2", "logging.tensorboard=true"], run_dir=tmp_path / "run")
    assert losses == plain_losses and not any(plain_val)  # bitwise: validation reads and changes nothing
    assert all(torch.equal(state[k], plain_state[k]) for k in state)
    assert [bool(v) for v in validation] == [False, True, False, True]
    assert validation[1]["val_ppl"] == pytest.approx(np.exp(validation[1]["val_loss"]))
    assert validation[3]["val_loss"] < validation[1]["val_loss"]  # it learns, and validation sees it
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "val_loss" in r] == [2, 4] and all("loss" in r for r in records)
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("validation at step")]
    assert len(lines) == 2 and "val loss" not in lines[0] and f"loss {validation[1]['val_loss']:.4f}" in lines[0]
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(tmp_path / "run" / "tensorboard")).Reload()
    assert {"lm loss validation", "lm loss validation ppl", "lm loss validation vs samples"} <= set(events.Tags()["scalars"])
    assert [e.value for e in events.Scalars("lm loss validation")] == pytest.approx([v["val_loss"] for v in validation if v])


def test_bad_validation_settings_are_refused_before_training(tmp_path):
    from engine.config import ConfigError, load_config
    from engine.config_validation import validate
    from engine.eval.validation import blend_validation_data
    from engine.stage import Stage
    from stages.sft import SFTStage
    from tests.parity import stage_config

    with pytest.raises(ConfigError, match=r"data.split='1,x': expected up to three|data.split='9,1,1,1'"):
        validate(load_config(None, ["data.split=9,1,1,1"]))
    with pytest.raises(ConfigError, match="train.eval_iters=0: must be >= 1"):
        validate(load_config(None, ["train.eval_iters=0"]))
    cfg = validate(load_config(None, ["train.eval_interval=5"]))
    with pytest.raises(ConfigError, match=r"train.eval_interval=5: there is no validation data; set data.split"):
        Stage().build_validation_data(cfg)
    sft = stage_config(None, ["train.eval_interval=5", "sft.inputs=[x.jsonl]"], 1, "sft")
    with pytest.raises(ConfigError, match=r"set sft.valid_inputs=\[valid.jsonl\]"):
        SFTStage().build_validation_data(sft)
    bad = tmp_path / "valid.jsonl"
    bad.write_text('{"prompt": "a", "response": "b"}\n{"prompt": 3}\n')
    sft.sft.valid_inputs = [str(bad)]
    from data_pipeline import DataError

    with pytest.raises(DataError, match=r"valid.jsonl:2: expected text fields"):
        SFTStage().build_validation_data(sft)
    assert blend_validation_data  # imported for the message's module


def _parity_worker(rank, world_size, layouts):
    out = {}
    for name, overrides in layouts.items():
        trainer = _trainer([*overrides, "train.eval_interval=2"], world_size)
        first = trainer.evaluate()
        results = trainer.fit(0)
        out[name] = (first["val_loss"], [r.extra.get("val_loss") for r in results], [r.loss for r in results])
        if name == "pp2":  # the forward-only pipeline pass leaves the pipeline's training bitwise alone
            plain = _trainer(overrides, world_size)
            out["pp2_plain"] = [r.loss for r in plain.fit(0)]
    return out


def test_every_layout_gives_the_single_rank_validation_loss():
    from tests.distributed import run_distributed

    # The noise floor: the same weights and batches evaluated single-rank with other microbatch
    # splits (other GEMM shapes, other summation orders) differ only by fp32 rounding.
    passes = {mbs: _trainer([f"train.micro_batch_size={mbs}"]).evaluate()["val_loss"] for mbs in (1, 2, 4)}
    reference = passes[2]
    floor = max(abs(v - reference) / reference for v in passes.values())
    tolerance = max(8 * floor, 4 * 2.0 ** -24)
    single = _parity_worker(0, 1, {"single": ["train.eval_interval=2"]})["single"]
    results = run_distributed(_parity_worker, 2, LAYOUTS, timeout=600)[0]
    print(f"single-rank validation noise floor {floor:.2e} (mbs 1/2/4), tolerance {tolerance:.2e}")
    for name in LAYOUTS:
        first, later, losses = results[name]
        at_init = abs(first - single[0]) / single[0]
        trained = max(abs(a - b) / b for a, b in zip(later[1::2], single[1][1::2]))
        print(f"{name}: validation loss at init {at_init:.2e}, after training {trained:.2e} (relative)")
        assert at_init <= tolerance, (name, first, single[0])
        # After steps the weights carry the training's own rounding drift (the parity tests' 1e-5).
        assert trained <= 1e-5 + tolerance, (name, later, single[1])
    assert results["pp2"][2] == results["pp2_plain"]
