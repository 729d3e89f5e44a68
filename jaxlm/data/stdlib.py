"""The default corpus: the running interpreter's standard library, tokenized once into a cache.

`$JAXLM_CACHE` (default ~/.cache/jaxlm) gets one directory per Python version and vocabulary
size, `stdlib-py311-v4096/` say, holding the tokenizer and the prepared shards. The first use
builds it (seconds on two cores); later runs, and other processes of the same job, reuse it. A
file lock lets one process build while the others wait.
"""

import contextlib
import fcntl
import logging
import os
import pathlib
import sys

from jaxlm.data import corpus, prepare, tokenizer

log = logging.getLogger("jaxlm")

VAL_FRACTION = 0.02  # ~36 of 1,800 files held out


def cache_dir() -> pathlib.Path:
    return pathlib.Path(os.environ.get("JAXLM_CACHE", "~/.cache/jaxlm")).expanduser()


def dataset(vocab_size: int) -> pathlib.Path:
    """The prepared directory of the stdlib corpus for `vocab_size`, built on first use."""
    name = f"stdlib-py{sys.version_info.major}{sys.version_info.minor}-v{vocab_size}"
    target = cache_dir() / name
    if (target / "manifest.json").exists():
        return target
    # The lock lets one process build while the others wait (on one machine, or on a shared
    # file system that honours flock, as Lustre and GPFS do when mounted with it).
    with locked(cache_dir() / f"{name}.lock"):
        if not (target / "manifest.json").exists():  # another process may have built it
            log.info(
                "building the default corpus (Python %s standard library, vocabulary %d) "
                "in %s; later runs reuse it",
                sys.version.split()[0],
                vocab_size,
                target,
            )
            inputs = corpus.stdlib_inputs()
            model = tokenizer.train(inputs.documents(), vocab_size, target / "tokenizer.model")
            prepare.prepare(inputs, model, target, val_fraction=VAL_FRACTION)
    return target


@contextlib.contextmanager
def locked(path: pathlib.Path):
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)
