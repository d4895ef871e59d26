"""What a training stage is, and how the engine finds the stages it can run.

The engine runs any stage it is handed and names none (docs/ARCHITECTURE.md): pre-training,
mid-training, SFT, DPO and GRPO live in `stages/`, and a stage outside the package is named by
'package.module:attribute' and registered the same way. A stage is four things:

- its config sections (`sections`: {"sft": SFTConfig}), loaded, checked and saved like the
  engine's own sections (`cfg.<section>.<field>`), and the data they name (`inputs_key`);
- how it checks them (`validate`) and how it adjusts the run before it starts (`prepare`:
  e.g. a branch's starting checkpoint, a deprecated key);
- how it builds its data (`build_data`; None trains on the pre-training blend);
- its trainer (`trainer_class`: the engine's Trainer, or a subclass with another objective).

Each stage has a preset (`default_config`, a YAML file under configs/) loaded when no --config is
given: fine-tuning wants other hyperparameters than pre-training (configs/sft.yaml, dpo.yaml,
grpo.yaml). A preset's values count as defaults: `cfg.explicit` holds only what the user's file
and --set say, which is what a checkpoint's architecture (train.init_from) must not contradict
and what decides whether train.steps or train.epochs sets the length of the run.

A config carries only the sections of the stage that runs. Sections of the other registered
stages are still accepted, so the config.yaml of an earlier run loads for any stage: left at
their defaults they are ignored; a setting that belongs to another stage (its inputs, a branch
point) is refused with the stage that would use it (`StageRegistry.check_foreign`).
"""
from __future__ import annotations

import dataclasses
import importlib
import sys
from pathlib import Path
from types import MappingProxyType
from typing import Iterable, Mapping, Optional

from engine.config import ApogeeConfig, ConfigError, config_from_dict, load_config

ROOT = Path(__file__).resolve().parents[1]
"""The repository root, where a stage's `default_config` is found."""


class Stage:
    """A training stage the engine can run (subclass it; every hook has the engine's default)."""

    name: str = ""
    """The command that runs it (`apogee <name>`) and its name in logs."""
    help: str = ""
    """One line for `apogee --help`."""
    sections: Mapping[str, type] = MappingProxyType({})
    """Config sections this stage owns: section name -> dataclass (one docstring per field)."""
    inputs_key: Optional[str] = None
    """'section.field' listing the stage's own data (e.g. 'sft.inputs'); None: the pre-training blend."""
    inputs_what: str = ""
    """What those inputs are, for messages ('fine-tuning examples')."""
    inputs_needs: str = ""
    """What a valid value looks like, for the message when they are missing."""
    default_config: Optional[str] = "configs/tiny.yaml"
    """The preset loaded when no --config is given (relative to the repository root, or absolute);
    None: the dataclass defaults."""

    def inputs(self, cfg: ApogeeConfig) -> list:
        """The stage's own inputs in `cfg` ([] when it trains on the pre-training blend)."""
        if self.inputs_key is None:
            return []
        section, field = self.inputs_key.split(".")
        return list(getattr(getattr(cfg, section), field))

    def samples_per_epoch(self, cfg: ApogeeConfig, examples: int) -> int:
        """Samples one epoch over `examples` input lines makes (train.epochs counts these): one each,
        unless the stage packs several into a sample (sft.packing, dpo.packing)."""
        return examples

    def claim(self, sections: Mapping[str, object]) -> Optional[str]:
        """Why a run of another stage must not carry these (this stage's) section values, or None.

        By default: its inputs are set ("sft.inputs=[...]: fine-tuning examples are trained by
        `apogee sft`"). A stage with other settings that only it can act on overrides this.
        """
        if self.inputs_key is None:
            return None
        section, field = self.inputs_key.split(".")
        value = getattr(sections[section], field) if section in sections else None
        if value:
            return f"{self.inputs_key}={value}: {self.inputs_what} are trained by `apogee {self.name}`"
        return None

    def prepare(self, cfg: ApogeeConfig, run_dir: Optional[str], resume: str) -> str:
        """Adjust `cfg` before the run is validated (the process the user started); returns the
        `--resume` choice to run with. The default requires the stage's inputs and turns
        train.epochs into train.steps (`steps_from_epochs`)."""
        if self.inputs_key is not None and not self.inputs(cfg):
            raise ConfigError(f"{self.inputs_key}=[]: `apogee {self.name}` needs {self.inputs_needs}")
        steps_from_epochs(cfg, self)
        return resume

    def validate(self, cfg: ApogeeConfig, world_size: int) -> None:
        """Check the stage's own rules (its sections, the layouts and precisions it supports)."""

    def build_data(self, cfg: ApogeeConfig):
        """The stage's data (addressed by step, microbatch and data-parallel rank, like
        data_pipeline.loader.TrainingData), or None to train on the pre-training blend."""
        return None

    def build_validation_data(self, cfg: ApogeeConfig):
        """Held-out data for train.eval_interval's validation passes, addressed like `build_data`'s.
        The default: the pre-training blend's (data.split's validation part, or data.valid_inputs);
        a stage with its own data holds out its own (ConfigError when a pass has no data)."""
        from engine.eval.validation import blend_validation_data

        return blend_validation_data(cfg)

    def trainer_class(self, cfg: ApogeeConfig) -> type:
        """The Trainer (sub)class that runs this stage's steps."""
        from engine.train.trainer import Trainer

        return Trainer

    def __reduce__(self):
        # Ranks started by the elastic agent receive the stage pickled: by name of its class, so
        # a stage is rebuilt from code in each rank, never from data.
        return (type(self), ())


class StageRegistry:
    """The stages a command can run, by name: the built-in ones and any registered from outside."""

    def __init__(self, stages: Iterable[Stage] = ()):
        self._stages: dict[str, Stage] = {}
        for stage in stages:
            self.register(stage)

    def register(self, stage: Stage) -> Stage:
        """Add `stage`; its name and section names must be new (a clear ConfigError otherwise)."""
        if not isinstance(stage, Stage) or not stage.name:
            raise ConfigError(f"{stage!r}: a stage is an engine.stage.Stage with a name")
        if stage.name in self._stages:
            raise ConfigError(f"stage {stage.name!r} is registered already (by {type(self._stages[stage.name]).__module__})")
        core = {f.name for f in dataclasses.fields(ApogeeConfig)}
        for section in stage.sections:
            owner = next((s.name for s in self._stages.values() if section in s.sections), None)
            if section in core or owner is not None:
                raise ConfigError(f"stage {stage.name!r}: config section {section!r} belongs to "
                                  f"{'the engine' if owner is None else f'stage {owner!r}'}")
        self._stages[stage.name] = stage
        return stage

    def names(self) -> list[str]:
        """Registered stage names, in registration order."""
        return list(self._stages)

    def get(self, name: str) -> Stage:
        """The stage called `name`, or one named 'package.module:attribute' (imported and registered)."""
        if name in self._stages:
            return self._stages[name]
        if ":" in name:
            return self.register(import_stage(name))
        raise ConfigError(f"stage {name!r}: expected one of {', '.join(self._stages)} or 'package.module:Stage'")

    def foreign_sections(self, stage: Stage) -> dict[str, type]:
        """Sections of every other registered stage (accepted in a config, see the module doc)."""
        return {name: cls for other in self._stages.values() if other is not stage
                for name, cls in other.sections.items()}

    def load_config(self, stage: Stage, path=None, overrides=None) -> ApogeeConfig:
        """defaults <- the stage's preset (without --config) or the YAML file <- --set overrides, with
        `stage`'s sections live; a Hugging Face train.init_from then brings its architecture."""
        from engine.state.init_from import adopt_hf_architecture

        preset = None
        if path is None and stage.default_config is not None:
            preset = ROOT / stage.default_config
            if not preset.is_file():
                raise ConfigError(f"stage {stage.name!r}: its preset {preset} is missing; pass --config FILE")
        cfg = load_config(path, overrides, sections=stage.sections, foreign=self.foreign_sections(stage), preset=preset)
        adopt_hf_architecture(cfg)
        return cfg

    def config_from_dict(self, stage: Stage, data: dict) -> ApogeeConfig:
        """A config saved with `to_dict()`, rebuilt with `stage`'s sections (ranks, run directories)."""
        return config_from_dict(data, sections=stage.sections, foreign=self.foreign_sections(stage))

    def check_foreign(self, stage: Stage, cfg: ApogeeConfig) -> None:
        """Refuse another stage's settings in a run of `stage` (one rule for every stage):
        two stages' inputs at once, or settings another stage claims; other non-default values of
        other stages' sections are ignored with a note on stderr."""
        own = stage.inputs(cfg)
        others = [other for other in self._stages.values() if other is not stage]
        with_inputs = [o for o in others if o.inputs_key and o.inputs_key.split(".")[0] in cfg.foreign
                       and o.inputs(_Sections(cfg.foreign))]
        if own and with_inputs:
            keys = [stage.inputs_key] + [o.inputs_key for o in with_inputs]
            kinds = [s.inputs_what for s in self._stages.values() if s.inputs_key]
            raise ConfigError(f"{keys[-1]}='set': a run trains {', '.join(kinds[:-1])} or {kinds[-1]}, only one "
                              f"of them (set: {', '.join(keys)})")
        for other in others:
            mine = {name: cfg.foreign[name] for name in other.sections if name in cfg.foreign}
            message = other.claim(mine) if mine else None
            if message is not None:
                raise ConfigError(message)
            for name, section in mine.items():
                default = other.sections[name]()
                for field in dataclasses.fields(section):
                    value = getattr(section, field.name)
                    if value != getattr(default, field.name):
                        print(f"apogee: note: {name}.{field.name}={value!r} is a setting of `apogee {other.name}`; "
                              f"`apogee {stage.name}` ignores it", file=sys.stderr)


def steps_from_epochs(cfg: ApogeeConfig, stage: Stage) -> None:
    """train.epochs -> train.steps = ceil(epochs * samples / global batch) over the stage's own
    inputs (one example per JSONL line, `Stage.samples_per_epoch` samples of them: fewer when
    packed); train.steps set by the user (file or --set) wins."""
    import math

    t = cfg.train
    if t.epochs is None:
        return
    if "train.steps" in cfg.explicit:
        if "train.epochs" in cfg.explicit:
            print(f"apogee: note: train.steps={t.steps} is set, so train.epochs={t.epochs:g} is ignored", file=sys.stderr)
        t.epochs = None
        return
    if stage.inputs_key is None:
        raise ConfigError(f"train.epochs={t.epochs}: `apogee {stage.name}` trains on the pre-training blend, whose "
                          f"length is train.steps; leave train.epochs out")
    inputs = stage.inputs(cfg)
    if not all(Path(path).is_file() for path in inputs):
        return  # the stage's data reader refuses them, after the layout's and init_from's checks
    # Non-blank lines: each is one example (the reader checks them later, naming file:line).
    examples = 0
    for path in inputs:
        with open(path, encoding="utf-8", errors="replace") as lines:
            examples += sum(1 for line in lines if line.strip())
    samples = stage.samples_per_epoch(cfg, examples)
    packed = f" ({samples} packed samples)" if samples != examples else ""
    t.steps = max(1, math.ceil(t.epochs * samples / t.global_batch_size))
    print(f"apogee: train.epochs={t.epochs:g} over {examples} examples{packed} at train.global_batch_size="
          f"{t.global_batch_size}: train.steps={t.steps}", file=sys.stderr)


class _Sections:
    """Attribute access to a dict of config sections (Stage.inputs on foreign sections)."""

    def __init__(self, sections: Mapping[str, object]):
        self._sections = sections

    def __getattr__(self, name: str):
        try:
            return self.__dict__["_sections"][name]
        except KeyError:
            raise AttributeError(name) from None


def import_stage(spec: str) -> Stage:
    """The stage named by 'package.module:attribute' (a Stage subclass or instance); importing a
    module the user named is how external code extends Apogee, as with a reward function."""
    module_name, _, attribute = spec.partition(":")
    if not module_name or not attribute:
        raise ConfigError(f"stage {spec!r}: expected 'package.module:Stage'")
    cwd = str(Path.cwd())
    if cwd not in sys.path:  # a stage module next to the user's config, as `python -m` would find it
        sys.path.append(cwd)
    try:
        found = getattr(importlib.import_module(module_name), attribute)
    except (ImportError, AttributeError) as error:
        raise ConfigError(f"stage {spec!r}: cannot import {attribute!r} from {module_name!r} ({error})") from None
    stage = found() if isinstance(found, type) and issubclass(found, Stage) else found
    if not isinstance(stage, Stage):
        raise ConfigError(f"stage {spec!r}: {attribute} is not an engine.stage.Stage (subclass or instance)")
    return stage
