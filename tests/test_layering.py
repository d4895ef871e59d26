"""The arrows of docs/ARCHITECTURE.md: the project keeps them, and the checker catches each kind of break."""
import re
import textwrap
from pathlib import Path

import pytest

from tests.layering import PRODUCT, check_tree, module_name

ROOT = Path(__file__).resolve().parents[1]


def test_the_project_keeps_every_layering_rule():
    problems = check_tree(ROOT)
    assert problems == [], "\n".join(problems)


def _tree(tmp_path: Path, files: dict) -> Path:
    """A synthetic project: the clean files below plus `files` (path -> source)."""
    clean = {
        "parallel/__init__.py": "", "parallel/collectives.py": "import torch.distributed as dist\n"
                                                                "def all_reduce(t):\n    dist.all_reduce(t)\n",
        "data_pipeline/__init__.py": "", "data_pipeline/loader.py": "import numpy\n",
        "engine/__init__.py": "", "engine/stage.py": "from parallel import collectives\n",
        "engine/train/__init__.py": "", "engine/train/trainer.py": "from engine.stage import *\n",
        "stages/__init__.py": "", "stages/sft.py": "from engine.stage import Stage\n",
        "stages/dpo.py": "from engine.train import trainer\n",
        "stages/registry.py": "def builtin():\n    from stages import dpo, sft\n",
        "cli/__init__.py": "", "cli/main.py": "from stages.registry import builtin\n",
        "tests/__init__.py": "", "tests/helpers.py": "", "bench/bench_x.py": "from engine.stage import Stage\n",
    }
    for name, source in {**clean, **files}.items():
        path = tmp_path / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(textwrap.dedent(source))
    return tmp_path


def test_a_clean_synthetic_tree_passes(tmp_path):
    assert check_tree(_tree(tmp_path, {})) == []


@pytest.mark.parametrize("files, expected", [
    ({"engine/train/trainer.py": "def f():\n    from stages.sft import SFTStage\n"},  # a lazy import is an arrow too
     "engine/train/trainer.py: imports stages.sft (the engine imports no stage and no CLI)"),
    ({"engine/stage.py": "import cli.main\n"}, "engine/stage.py: imports cli.main (the engine imports no stage and no CLI)"),
    ({"parallel/collectives.py": "from engine import stage\n"},
     "parallel/collectives.py: imports engine.stage (parallel imports nothing of the project outside itself)"),
    ({"data_pipeline/loader.py": "from parallel.collectives import all_reduce\n"},
     "data_pipeline/loader.py: imports parallel.collectives (data_pipeline imports neither engine, parallel nor stages)"),
    ({"stages/dpo.py": "from . import sft\n"}, "stages/dpo.py: imports stages.sft (one stage never imports another)"),
    ({"bench/bench_x.py": "from tests.helpers import x\n"},
     "bench/bench_x.py: imports tests.helpers (bench/ and the product never import tests/)"),
    ({"engine/stage.py": "import torch.distributed as dist\ndist.broadcast_object_list([1], src=0)\n"},
     "engine/stage.py: calls torch.distributed broadcast_object_list (collectives live in parallel/collectives.py)"),
    ({"engine/stage.py": "from torch.distributed import all_gather\n"},
     "engine/stage.py: calls torch.distributed all_gather (collectives live in parallel/collectives.py)"),
    ({"engine/stage.py": "import torch\ntorch.distributed.init_process_group('gloo')\n"},
     "engine/stage.py: calls torch.distributed init_process_group (process groups live in parallel/)"),
    ({"engine/stage.py": "x = 1\n" * 451}, "engine/stage.py: 451 lines (at most 450: one concept per module)"),
    ({"engine/stage.py": "def f(cfg):\n    return cfg.grpo.inputs\n"}, "engine/stage.py:2: names a stage's config section"),
    ({"engine/stage.py": "from engine.train import trainer\n"},
     "import cycle: engine."),
])
def test_each_forbidden_arrow_is_reported(tmp_path, files, expected):
    problems = check_tree(_tree(tmp_path, files))
    assert any(p.startswith(expected) for p in problems), problems
    if expected.startswith("import cycle"):
        assert {"engine.stage", "engine.train.trainer"} <= set(problems[-1].split(": ")[1].split(" -> "))


def test_docs_architecture_names_every_module_of_the_product():
    """docs/ARCHITECTURE.md is the map: every product module appears in it by its path."""
    text = (ROOT / "docs" / "ARCHITECTURE.md").read_text()
    modules = [str(p.relative_to(ROOT)) for top in PRODUCT for p in sorted((ROOT / top).rglob("*.py"))
               if p.name != "__init__.py"]
    missing = [m for m in modules if not re.search(rf"(?<![\w/.]){re.escape(m)}\b", text)]
    assert modules and missing == [], f"modules not on the map in docs/ARCHITECTURE.md: {missing}"
    stale = [m for m in re.findall(r"\b(?:%s)/[\w/]+\.py\b" % "|".join(PRODUCT), text) if not (ROOT / m).is_file()]
    assert stale == [], f"docs/ARCHITECTURE.md names modules that do not exist: {stale}"


def test_module_names_follow_paths():
    assert module_name(ROOT, ROOT / "engine" / "train" / "trainer.py") == "engine.train.trainer"
    assert module_name(ROOT, ROOT / "engine" / "model" / "__init__.py") == "engine.model"
