"""Compose the project's Hydra config from Python (tests, benchmarks, notebooks).

The configs live in the top-level `conf/` directory of the repository and ship inside the
package as `poisonlab/conf/` (pyproject.toml maps the `poisonlab.conf` package onto `conf/`).
`CONF_DIR` is the directory Hydra reads them from:

* regular install (`pip install .` / a wheel): `<site-packages>/poisonlab/conf`
* source checkout or editable install (`pip install -e .`): `<repo>/conf`
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path


def _find_conf_dir() -> Path:
    # Installed package: the configs are package data next to the code.
    packaged = resources.files("poisonlab").joinpath("conf")
    candidates = [packaged] if isinstance(packaged, Path) else []  # not a zipped install
    # Source checkout and editable install: the code is <repo>/poisonlab, the configs <repo>/conf.
    candidates.append(Path(__file__).resolve().parents[1] / "conf")
    for conf in candidates:
        if (conf / "config.yaml").is_file():
            return conf.resolve()
    raise RuntimeError("poisonlab: cannot find the Hydra configs (conf/config.yaml); looked in "
                       + ", ".join(str(c) for c in candidates))


CONF_DIR = _find_conf_dir()


def _register_resolvers() -> None:
    """Config resolvers: ``${backdoorllm:<file>,<root>,<task>,<attack>}`` (a file of a local
    copy of BackdoorLLM's data, `poisonlab.data.backdoorllm`)."""
    from omegaconf import OmegaConf

    def backdoorllm(file, root, task, attack):
        from poisonlab.data.backdoorllm import path
        return path(file, root, task, attack)

    if not OmegaConf.has_resolver("backdoorllm"):
        OmegaConf.register_new_resolver("backdoorllm", backdoorllm)


_register_resolvers()


def poisonlab_cause(error: BaseException | None):
    """The PoisonlabError behind `error`: itself, or the one OmegaConf wrapped (as the cause or
    context of its InterpolationResolutionError) when a config resolver refused its input."""
    from poisonlab import PoisonlabError

    seen = set()
    while error is not None and id(error) not in seen:
        if isinstance(error, PoisonlabError):
            return error
        seen.add(id(error))
        error = error.__cause__ or error.__context__
    return None


def compose_config(*overrides: str):
    """The same config `python -m poisonlab.run <overrides>` would get (without `hydra.*`)."""
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(config_dir=str(CONF_DIR), version_base=None):
        return compose(config_name="config", overrides=list(overrides))


# ----------------------------------------------------------------------------- value checks
# One-line errors that name the key, shared by the pipeline and the defences.

def _error(msg: str):
    from poisonlab import PoisonlabError

    return PoisonlabError(msg)


def positive_int(cfg, key: str, allow_none: bool = False) -> None:
    from omegaconf import OmegaConf

    value = OmegaConf.select(cfg, key)
    if value is None and allow_none:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise _error(f"{key} must be a positive integer, got {value!r}")


def positive_number(cfg, key: str) -> None:
    from omegaconf import OmegaConf

    v = OmegaConf.select(cfg, key)
    if isinstance(v, bool) or not isinstance(v, (int, float)) or v <= 0:
        raise _error(f"{key} must be a positive number, got {v!r}")


def open_fraction(cfg, key: str) -> None:
    """A number strictly between 0 and 1 (a pruning ratio, a probability)."""
    from omegaconf import OmegaConf

    v = OmegaConf.select(cfg, key)
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0 < v < 1:
        raise _error(f"{key} must be a number in (0, 1), got {v!r}")


def one_of(cfg, key: str, choices, default=None) -> None:
    from omegaconf import OmegaConf

    v = OmegaConf.select(cfg, key, default=default)
    if v not in choices:
        raise _error(f"{key}: unknown value {v!r} ({', '.join(map(str, choices))})")
