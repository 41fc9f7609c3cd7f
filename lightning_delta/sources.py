"""Where weights and models come from: a module, a state dict, safetensors, ``.bin`` files, a directory or the Hub.

A :class:`TensorSource` lists the names of a model's tensors and hands them out one by one. safetensors files are
memory-mapped with ``safe_open`` and read tensor by tensor, so two large checkpoints never sit in memory together.
``.bin`` files are read with ``torch.load(weights_only=True, mmap=True)`` only: nothing is ever unpickled.

Tied tensors (the same storage under two names, e.g. a Llama's ``model.embed_tokens.weight`` and ``lm_head.weight``
when ``tie_word_embeddings`` is set) are listed once, under the first name in state-dict order; the other names are
aliases that :meth:`TensorSource.get` still accepts.

Whole models are loaded by :func:`load_model`, the library's one model loader (the post-trained model, the DPO
reference, CLIP towers and the model :func:`~lightning_delta.export.save_edited` writes): ``from_pretrained`` of
transformers' own classes only (``trust_remote_code`` is never set), on a local directory or the snapshot of a hub id
that :func:`resolve_hub_id` fetched (safetensors first).
"""

from __future__ import annotations

import json
import os
import pickle
import warnings
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any, Protocol, cast

import torch
from huggingface_hub.constants import CONFIG_NAME, PYTORCH_WEIGHTS_NAME, SAFETENSORS_INDEX_FILE, SAFETENSORS_SINGLE_FILE
from huggingface_hub.utils import HFValidationError, validate_repo_id
from torch import Tensor, nn
from torch.distributed.tensor import DTensor

__all__ = [
    "ModelClass",
    "SavesPretrained",
    "TensorSource",
    "check_dtype",
    "format_names",
    "load_model",
    "load_tensors",
    "model_directory",
    "resolve_hub_id",
    "resolve_model_class",
    "resolve_model_path",
    "tied_names",
]

# Weight files of a Hugging Face model directory, in the order they are looked for. huggingface_hub names all but the
# .bin index, which is the .bin file's name + ".index.json" (as transformers' WEIGHTS_INDEX_NAME; transformers itself
# is not imported here, as it takes a second).
BIN_INDEX_FILE = PYTORCH_WEIGHTS_NAME + ".index.json"
WEIGHT_FILES = (SAFETENSORS_INDEX_FILE, SAFETENSORS_SINGLE_FILE, BIN_INDEX_FILE, PYTORCH_WEIGHTS_NAME)

# What is fetched from the Hub (or its offline cache) for a hub id: safetensors first, .bin only where none exist.
HUB_SAFETENSORS_PATTERNS = ["*.safetensors", "*.safetensors.index.json", "*.json"]
HUB_BIN_PATTERNS = ["*.bin", "*.bin.index.json", "*.json"]

# Names that look like weight files are never taken for hub ids (a missing "model.safetensors" is a missing file).
_FILE_SUFFIXES = (".safetensors", ".bin", ".json", ".pt", ".pth")


def format_names(names: Iterable[str], limit: int = 10) -> str:
    """``names`` as a comma-separated list, at most ``limit`` of them, then ``"and N more"``.

    Example:
        >>> format_names(["a", "b", "c"], limit=2)
        'a, b and 1 more'
    """
    names = list(names)
    shown = ", ".join(names[:limit])
    if len(names) > limit:
        shown += f" and {len(names) - limit} more"
    return shown


class TensorSource:
    """The tensors of one model, listed by name and loaded one at a time.

    ``keys()`` lists each distinct tensor once, in the model's order; ``tied`` maps a kept name to the other names
    of the same tensor (its aliases). ``get``, ``shape`` and ``dtype`` accept a kept name or an alias. A source
    that opened files closes them in :meth:`close` (or at the end of a ``with`` block).
    """

    description: str = "tensors"

    def __init__(self, names: list[str], tied: dict[str, list[str]] | None = None) -> None:
        self._names = list(names)
        self.tied: dict[str, list[str]] = {kept: list(aliases) for kept, aliases in (tied or {}).items() if aliases}
        self._canonical = {name: name for name in self._names}
        for kept, aliases in self.tied.items():
            for alias in aliases:
                self._canonical[alias] = kept

    def keys(self) -> list[str]:
        """The kept names (one per distinct tensor), in the model's order."""
        return list(self._names)

    def __contains__(self, name: object) -> bool:
        return name in self._canonical

    def __len__(self) -> int:
        return len(self._names)

    def canonical(self, name: str) -> str:
        """The kept name of ``name`` (itself unless it is an alias of a tied tensor)."""
        try:
            return self._canonical[name]
        except KeyError:
            raise KeyError(f"{name!r} is not a tensor of {self.description}") from None

    def group(self, name: str) -> list[str]:
        """Every name of the tensor called ``name``: the kept name first, then its aliases."""
        kept = self.canonical(name)
        return [kept, *self.tied.get(kept, [])]

    def get(self, name: str) -> Tensor:
        """The tensor ``name``, loaded now (on CPU for files)."""
        return self._get(self.canonical(name))

    def shape(self, name: str) -> torch.Size:
        """The shape of ``name``, without loading it where the format allows."""
        return self._shape(self.canonical(name))

    def dtype(self, name: str) -> torch.dtype:
        """The dtype of ``name``, without loading it where the format allows."""
        return self._dtype(self.canonical(name))

    def rows(self, name: str, start: int, stop: int) -> Tensor:
        """Rows ``start:stop`` (the first dimension) of ``name``; only those rows are read where the format allows
        (a safetensors slice; a memory-mapped ``.bin`` touches only their pages)."""
        return self._rows(self.canonical(name), start, stop)

    def sharded(self, name: str) -> DTensor | None:
        """The ``DTensor`` stored under ``name`` when it is one (a parameter of a model sharded by FSDP2)."""
        return None

    def _get(self, name: str) -> Tensor:
        raise NotImplementedError

    def _rows(self, name: str, start: int, stop: int) -> Tensor:
        return self._get(name)[start:stop]

    def _shape(self, name: str) -> torch.Size:
        return self._get(name).shape

    def _dtype(self, name: str) -> torch.dtype:
        return self._get(name).dtype

    def close(self) -> None:
        """Release open files. A closed source must not be used again."""

    def __enter__(self) -> TensorSource:
        return self

    def __exit__(self, *exc_info: Any) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.description}, {len(self._names)} tensors)"


def _storage_key(tensor: Tensor) -> tuple | None:
    """What identifies the memory a tensor views: equal keys mean the same values under two names."""
    if isinstance(tensor, DTensor):  # a parameter sharded by FSDP2: its own rows identify it
        tensor = tensor.to_local()
    if tensor.device.type == "meta" or tensor.numel() == 0:
        return None
    try:
        pointer = tensor.untyped_storage().data_ptr()
    except (RuntimeError, NotImplementedError):  # tensor subclasses without a plain storage
        return None
    return (tensor.device, pointer, tensor.storage_offset(), tuple(tensor.shape), tuple(tensor.stride()), tensor.dtype)


def _group_tied(state: Mapping[str, Tensor]) -> tuple[list[str], dict[str, list[str]]]:
    """The kept names (first of each group of tensors sharing memory) and the kept name -> aliases map."""
    first_name: dict[tuple, str] = {}
    kept: list[str] = []
    tied: dict[str, list[str]] = {}
    for name, tensor in state.items():
        key = _storage_key(tensor)
        if key is not None and key in first_name:
            tied.setdefault(first_name[key], []).append(name)
            continue
        if key is not None:
            first_name[key] = name
        kept.append(name)
    return kept, tied


def tied_names(module: nn.Module | Mapping[str, Tensor]) -> dict[str, list[str]]:
    """The tied tensors of a module (or state dict): kept name -> the other names of the same tensor.

    The kept name is the first in state-dict order. Only tied tensors appear.

    Example:
        >>> layer = nn.Linear(2, 2)
        >>> model = nn.ModuleDict({"a": layer, "b": layer})
        >>> tied_names(model)
        {'a.weight': ['b.weight'], 'a.bias': ['b.bias']}
    """
    state: Mapping[str, Tensor]
    if isinstance(module, nn.Module):
        state = module.state_dict()
    elif isinstance(module, Mapping):
        state = module
    else:
        raise ValueError(f"tied_names expects an nn.Module or a state dict, got {type(module).__name__}.")
    return _group_tied(state)[1]


class MappingSource(TensorSource):
    """The tensors of an ``nn.Module`` (its ``state_dict``, taken when the source is made) or of a state dict."""

    def __init__(self, state: Mapping[str, Tensor], description: str) -> None:
        bad = [name for name, value in state.items() if not isinstance(value, Tensor)]
        if bad:
            first = state[bad[0]]
            raise ValueError(
                f"A state dict must map names to tensors; {format_names(repr(name) for name in bad)} "
                f"hold {type(first).__name__} and other non-tensor values. Pass only the tensors."
            )
        self._state = state
        self.description = description
        kept, tied = _group_tied(state)
        super().__init__(kept, tied)

    def _get(self, name: str) -> Tensor:
        tensor = self._state[name]
        # A sharded (FSDP2) tensor is gathered whole: a collective, reached in the same order on every process.
        return tensor.full_tensor() if isinstance(tensor, DTensor) else tensor

    def sharded(self, name: str) -> DTensor | None:
        tensor = self._state[self.canonical(name)]
        return tensor if isinstance(tensor, DTensor) else None

    def _shape(self, name: str) -> torch.Size:
        return self._state[name].shape

    def _dtype(self, name: str) -> torch.dtype:
        return self._state[name].dtype

    def close(self) -> None:
        self._state = {}


class SafetensorsSource(TensorSource):
    """Tensors in one or more safetensors files, memory-mapped and read one at a time."""

    def __init__(self, files: Mapping[str, Path], description: str) -> None:
        self._files = dict(files)  # tensor name -> file
        self._handles: dict[Path, Any] = {}
        self.description = description
        super().__init__(list(self._files))

    def _handle(self, path: Path) -> Any:
        from safetensors import SafetensorError, safe_open

        if path not in self._handles:
            try:
                handle = safe_open(str(path), framework="pt", device="cpu")
            except (SafetensorError, OSError) as error:
                raise ValueError(f"Cannot read the safetensors file {path} ({error}).") from error
            self._handles[path] = handle
            expected = {name for name, file in self._files.items() if file == path}
            absent = sorted(expected - set(handle.keys()))
            if absent:
                raise ValueError(
                    f"The index of {self.description} places {format_names(absent)} in {path.name}, which does "
                    "not hold them: the checkpoint is incomplete or its index is out of date."
                )
        return self._handles[path]

    def _get(self, name: str) -> Tensor:
        return self._handle(self._files[name]).get_tensor(name)

    def _rows(self, name: str, start: int, stop: int) -> Tensor:
        return self._handle(self._files[name]).get_slice(name)[start:stop]

    def _shape(self, name: str) -> torch.Size:
        return torch.Size(self._handle(self._files[name]).get_slice(name).get_shape())

    def _dtype(self, name: str) -> torch.dtype:
        # safetensors' own table of its dtype codes ("BF16" -> torch.bfloat16); a code it lacks loads the tensor.
        from safetensors.torch import _TYPES as SAFETENSORS_DTYPES

        code = self._handle(self._files[name]).get_slice(name).get_dtype()
        dtype = SAFETENSORS_DTYPES.get(code)
        return dtype if dtype is not None else self._get(name).dtype

    def close(self) -> None:
        for handle in self._handles.values():
            exit_ = getattr(handle, "__exit__", None)
            if exit_ is not None:
                exit_(None, None, None)
        self._handles.clear()


def _torch_load(path: Path) -> dict[str, Tensor]:
    """A ``.bin`` state dict, read with ``weights_only=True`` (never unpickling objects) and memory-mapped."""
    try:
        try:
            loaded = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as error:
            if "mmap" not in str(error):
                raise
            # The legacy (pre zip) format cannot be memory-mapped; it is read whole, still with weights_only.
            warnings.warn(
                f"{path} uses the legacy torch.save format, which cannot be memory-mapped; it is read whole.",
                stacklevel=2,
            )
            loaded = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        raise ValueError(
            f"{path} holds objects other than tensors and plain containers, so it was not loaded: unpickling them "
            "could run arbitrary code (torch.load is only called with weights_only=True). Convert the checkpoint "
            f"to safetensors in a trusted environment. Details: {str(error).splitlines()[0]}"
        ) from error
    except (RuntimeError, OSError, EOFError) as error:
        raise ValueError(f"Cannot read {path} as a torch checkpoint ({error}).") from error
    if isinstance(loaded, Mapping) and "state_dict" in loaded and isinstance(loaded["state_dict"], Mapping):
        loaded = loaded["state_dict"]
    if not isinstance(loaded, Mapping) or not all(isinstance(value, Tensor) for value in loaded.values()):
        raise ValueError(
            f"{path} does not hold a state dict (a mapping of names to tensors) but {type(loaded).__name__}."
        )
    return dict(loaded)


class TorchBinSource(MappingSource):
    """Tensors in ``.bin`` files, loaded with ``weights_only=True`` and memory-mapped."""

    def __init__(self, paths: list[Path], description: str) -> None:
        state: dict[str, Tensor] = {}
        for path in paths:
            for name, tensor in _torch_load(path).items():
                if name in state:
                    raise ValueError(f"{name!r} appears in more than one file of {description}.")
                state[name] = tensor
        super().__init__(state, description)


def _read_index(path: Path) -> dict[str, Path]:
    """The ``weight_map`` of a sharded checkpoint's index: tensor name -> shard file (checked to exist)."""
    try:
        weight_map = json.loads(path.read_text())["weight_map"]
    except (OSError, ValueError, KeyError, TypeError) as error:
        raise ValueError(f"{path} is not a sharded-checkpoint index with a 'weight_map' ({error}).") from error
    files = {name: path.parent / shard for name, shard in weight_map.items()}
    missing = sorted({file.name for file in files.values() if not file.is_file()})
    if missing:
        raise ValueError(
            f"The shards {format_names(missing)} listed in {path} do not exist; the download is incomplete."
        )
    return files


def _safetensors_file(path: Path, description: str) -> SafetensorsSource:
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt", device="cpu") as handle:
            names = list(handle.keys())
    except (SafetensorError, OSError) as error:
        raise ValueError(f"Cannot read the safetensors file {path} ({error}).") from error
    return SafetensorsSource({name: path for name in names}, description)


def _from_file(path: Path, description: str) -> TensorSource:
    name = path.name
    if name.endswith(".safetensors"):
        return _safetensors_file(path, description)
    if name.endswith(".safetensors.index.json"):
        return SafetensorsSource(_read_index(path), description)
    if name.endswith(".bin.index.json"):
        return TorchBinSource(sorted(set(_read_index(path).values())), description)
    if name.endswith((".bin", ".pt", ".pth")):
        return TorchBinSource([path], description)
    raise ValueError(
        f"Cannot read weights from {path}: expected a .safetensors file, a .bin/.pt/.pth state dict, "
        "a *.safetensors.index.json or *.bin.index.json index, or a model directory."
    )


def _weights_in_directory(directory: Path) -> Path | None:
    """The weight file or index to read in a model directory, or None."""
    for name in WEIGHT_FILES:
        if (directory / name).is_file():
            return directory / name
    for pattern in ("*.safetensors.index.json", "*.safetensors", "*.bin.index.json"):
        found = sorted(directory.glob(pattern))
        if len(found) == 1:
            return found[0]
        if len(found) > 1:
            raise ValueError(
                f"{directory} holds several {pattern} files ({format_names(file.name for file in found)}) and no "
                f"{SAFETENSORS_INDEX_FILE}; pass the path of the one to read."
            )
    return None


def _from_directory(directory: Path, description: str) -> TensorSource:
    weights = _weights_in_directory(directory)
    if weights is None:
        present = sorted(entry.name for entry in directory.iterdir())
        raise ValueError(
            f"No weights found in {directory}: expected {', '.join(WEIGHT_FILES)} (or a single *.safetensors file). "
            f"It holds: {format_names(present) or 'nothing'}."
        )
    return _from_file(weights, description)


def resolve_hub_id(repo_id: str, extra_patterns: Iterable[str] = ()) -> Path:
    """The local snapshot of hub model ``repo_id`` holding its weights and configuration.

    ``huggingface_hub.snapshot_download`` fetches only safetensors and JSON files (``.bin`` files only where the
    repository has no safetensors) plus ``extra_patterns``, and works offline from the Hub cache when
    ``HF_HUB_OFFLINE=1``.
    """
    from huggingface_hub import snapshot_download

    extra = list(extra_patterns)
    try:
        snapshot = Path(snapshot_download(repo_id, allow_patterns=HUB_SAFETENSORS_PATTERNS + extra))
        if _weights_in_directory(snapshot) is None:
            snapshot = Path(snapshot_download(repo_id, allow_patterns=HUB_BIN_PATTERNS + extra))
    except Exception as error:  # every failure of the hub client becomes the same clear message
        detail = str(error).splitlines()[0] if str(error) else ""
        raise ValueError(
            f"{repo_id!r} is neither an existing file or directory nor a model found on the Hugging Face Hub or in "
            f"its local cache ({type(error).__name__}: {detail}). Check the path, or download the model first when "
            "working offline (HF_HUB_OFFLINE=1)."
        ) from error
    return snapshot


def resolve_model_path(source: str | os.PathLike, extra_patterns: Iterable[str] = ()) -> Path:
    """A local path for ``source``: itself when it exists, else the snapshot of the hub id it names."""
    path = Path(source).expanduser()
    if path.exists():
        return path
    text = os.fspath(source)
    try:
        validate_repo_id(text)
    except HFValidationError:
        hub_id = False
    else:
        hub_id = not text.endswith(_FILE_SUFFIXES)
    if not hub_id:
        raise ValueError(f"The path {text!r} does not exist (and is not a hub id such as 'org/name').")
    return resolve_hub_id(text, extra_patterns)


def load_tensors(source: Any) -> TensorSource:
    """A :class:`TensorSource` over ``source``'s tensors, read lazily one at a time.

    ``source`` is an ``nn.Module`` (its ``state_dict``), a state dict (``Mapping[str, Tensor]``), a directory in
    Hugging Face format (``model.safetensors``, a sharded ``model.safetensors.index.json``, ``pytorch_model.bin`` or
    its sharded index), a ``.safetensors`` / ``.bin`` file, a hub id (resolved with ``snapshot_download``, offline
    from the cache when ``HF_HUB_OFFLINE=1``) or a :class:`TensorSource` (returned as is).

    Raises:
        ValueError: for an unsupported type, a path that does not exist, a directory without weights, an unreadable
            file or a ``.bin`` file holding anything but tensors.
    """
    if isinstance(source, TensorSource):
        return source
    if isinstance(source, nn.Module):
        return MappingSource(source.state_dict(), f"module {type(source).__name__}")
    if isinstance(source, Mapping):
        return MappingSource(source, f"state dict of {len(source)} entries")
    if isinstance(source, (str, os.PathLike)):
        path = resolve_model_path(source)
        if Path(source).expanduser().exists():
            description = f"{'directory' if path.is_dir() else 'file'} {path}"
        else:
            description = f"hub model {os.fspath(source)} ({path})"
        if path.is_dir():
            return _from_directory(path, description)
        return _from_file(path, description)
    raise ValueError(
        "Weights must be given as an nn.Module, a state dict (Mapping[str, Tensor]), a path to a model directory or "
        f"to a .safetensors/.bin file, a hub id, or a TensorSource; got {type(source).__name__}."
    )


def check_dtype(dtype: Any) -> torch.dtype | str | None:
    """``dtype`` as ``from_pretrained`` takes it: ``None``, ``"auto"`` or a ``torch.dtype`` (a name such as
    ``"bfloat16"`` becomes the dtype).

    Example:
        >>> check_dtype("bfloat16")
        torch.bfloat16
    """
    if dtype is None or dtype == "auto" or isinstance(dtype, torch.dtype):
        return dtype
    if isinstance(dtype, str) and isinstance(getattr(torch, dtype, None), torch.dtype):
        return getattr(torch, dtype)
    raise ValueError(
        f"dtype must be None, 'auto', a torch.dtype or its name ('float32', 'bfloat16', 'float16'), got {dtype!r}."
    )


def model_directory(source: str | os.PathLike, extra_patterns: Iterable[str] = ()) -> Path:
    """The Hugging Face model directory (with a ``config.json``) of a local path or a hub id (its snapshot, see
    :func:`resolve_hub_id`; ``extra_patterns`` are fetched besides the weights and JSON files)."""
    directory = resolve_model_path(source, extra_patterns)
    if not directory.is_dir() or not (directory / CONFIG_NAME).is_file():
        raise ValueError(
            f"{os.fspath(source)!r} must be a Hugging Face model directory (or hub id) with a config.json; "
            f"{directory} is not one."
        )
    return directory


class ModelClass(Protocol):
    """A class that loads models with ``from_pretrained``, as transformers' model classes and auto classes do (what
    :func:`resolve_model_class` gives)."""

    def from_pretrained(self, pretrained_model_name_or_path: Any, *args: Any, **kwargs: Any) -> Any: ...


class SavesPretrained(Protocol):
    """A model that writes itself in Hugging Face format with ``save_pretrained`` (a transformers model)."""

    def save_pretrained(self, save_directory: Any, **kwargs: Any) -> Any: ...


def resolve_model_class(model_class: type | str | None, directory: Path) -> ModelClass:
    """The class to call ``from_pretrained`` on: ``model_class`` (a class, or the name of one of transformers'), or
    the transformers class named in the directory's ``config.architectures`` (``AutoModel`` when transformers has no
    class by that name). Only transformers' own classes are named: remote code is never trusted."""
    import transformers  # here, not at the top: reading and differencing weights never needs it

    if isinstance(model_class, type):
        return cast(ModelClass, model_class)  # the caller's class: its from_pretrained is called as given
    if isinstance(model_class, str):
        found = getattr(transformers, model_class, None)
        if not isinstance(found, type) or not callable(getattr(found, "from_pretrained", None)):
            raise ValueError(
                f"model_class must be a model class or the name of one of transformers' (e.g. 'AutoModelForCausalLM',"
                f" 'CLIPModel'), got {model_class!r}."
            )
        return cast(ModelClass, found)  # checked above: it has from_pretrained
    if model_class is not None:
        raise ValueError(f"model_class must be a class, a class name or None, got {type(model_class).__name__}.")
    try:
        config = transformers.AutoConfig.from_pretrained(directory)
    except (OSError, ValueError, KeyError) as error:
        raise ValueError(f"Cannot read the model configuration in {directory} ({error}).") from error
    architecture = (getattr(config, "architectures", None) or [None])[0]
    found = getattr(transformers, architecture, None) if architecture else None
    if isinstance(found, type) and issubclass(found, transformers.PreTrainedModel):
        return found
    return transformers.AutoModel


def load_model(
    source: Any, dtype: Any = None, model_class: type | str | None = None, argument: str = "model"
) -> nn.Module:
    """A model: an ``nn.Module`` as it is, or ``from_pretrained`` of a Hugging Face directory or hub id.

    The one model loader of the library. A path or hub id goes through :func:`model_directory` (a hub id is fetched
    with ``snapshot_download``, safetensors first, offline from the cache when ``HF_HUB_OFFLINE=1``); the model comes
    back in eval mode. Remote code is never trusted (``trust_remote_code`` stays off), and ``.bin`` weights are read
    by transformers with ``weights_only=True``.

    Args:
        source: an ``nn.Module`` (returned as it is: neither cast nor moved), a local model directory or a hub id.
        dtype: ``None`` or ``"auto"`` (the stored dtype), a ``torch.dtype`` or its name.
        model_class: the class to load with: a class (``transformers.AutoModelForCausalLM``) or the name of one of
            transformers' (``"CLIPModel"``); ``None``: the class named in the config's ``architectures``.
        argument: the caller's name for ``source``, used in error messages.

    Raises:
        ValueError: for a ``source`` of another type, a path that does not exist and is not a hub id, a directory
            without ``config.json``, an unknown ``dtype`` or ``model_class``, or an unreadable config.
    """
    if isinstance(source, nn.Module):
        return source
    if not isinstance(source, (str, os.PathLike)):
        raise ValueError(
            f"`{argument}` must be an nn.Module, a local directory or a hub id, got {type(source).__name__}."
        )
    dtype = check_dtype(dtype)
    directory = model_directory(source)
    model = resolve_model_class(model_class, directory).from_pretrained(
        directory, dtype="auto" if dtype is None else dtype
    )
    return model.eval()
