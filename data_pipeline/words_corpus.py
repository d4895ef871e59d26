"""A small deterministic pseudo-English corpus (the same bytes on every machine), for tests and benchmarks.

The default corpus (the stdlib's source) differs between Python versions, so checked-in numbers
such as the golden loss curve are computed on this one instead.
"""
import random
from pathlib import Path

WORDS = ("the a one two red blue cat dog bird fish runs sleeps eats sees jumps over under near "
         "small big quick slow happy tree house river stone and then but so").split()


def write_corpus(directory: Path, documents: int = 300, seed: int = 0) -> Path:
    """Write `documents` short pseudo-English documents as a .jsonl file; returns its path."""
    import json

    rng = random.Random(seed)
    path = Path(directory) / "corpus.jsonl"
    with open(path, "w") as f:
        for _ in range(documents):
            sentences = [" ".join(rng.choice(WORDS) for _ in range(rng.randint(4, 12))).capitalize() + "."
                         for _ in range(rng.randint(2, 8))]
            f.write(json.dumps({"text": " ".join(sentences)}) + "\n")
    return path


def make_dataset(directory: Path) -> str:
    """Preprocess the corpus into DIRECTORY/corpus.bin/.idx with the byte tokenizer; returns the prefix."""
    from data_pipeline.preprocess import preprocess

    prefix = str(Path(directory) / "corpus")
    preprocess([str(write_corpus(directory))], prefix, tokenizer="byte", workers=1, progress=False)
    return prefix
