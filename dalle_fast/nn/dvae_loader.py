"""Read OpenAI's pickled dVAE checkpoints (encoder.pkl, decoder.pkl) without running code from them.

The official files are whole `dall_e.Encoder` / `dall_e.Decoder` modules written by torch.save (torch 1.7
era: the zip format; the older "legacy" format is read too). Plain torch.load would import dall_e and
execute whatever the pickle names. Here torch's own zip / legacy reader is driven with a restricted
unpickler (`pickle_module=`, weights_only=False only for that unpickler): `find_class` answers only

  * torch's tensor and parameter rebuild helpers and typed storages, torch.device, collections.OrderedDict,
    builtins.set (module bookkeeping), and
  * the module classes the official files reference (dall_e.encoder.Encoder / EncoderBlock,
    dall_e.decoder.Decoder / DecoderBlock, dall_e.utils.Conv2d, and torch.nn Sequential, ReLU, Identity,
    MaxPool2d, Upsample), each answered by an inert stand-in class that only stores the pickled attributes;

anything else raises UnsafePickleError naming the global. dall_e and the real torch.nn classes are never
imported or instantiated from the file. The stand-in tree is then checked against the architecture its
hyperparameters describe, and its tensors are loaded with strict=True into a dalle_fast.nn.Encoder or
Decoder.
"""

import _compat_pickle
import os
import pickle
import types
import warnings
import zipfile
from collections import OrderedDict

import torch
from torch import nn

from .dvae import Conv2d, Decoder, DecoderBlock, DiscreteVAE, Encoder, EncoderBlock


class UnsafePickleError(pickle.UnpicklingError):
    """The pickle names a global outside the dVAE loader's allowlist (or has an unexpected structure)."""


class _PickledModule:
    """Inert stand-in for a pickled module: NEWOBJ makes one without arguments and BUILD hands it the
    pickled attribute dict, which is stored as data. Nothing of the real class runs."""

    pickled_name = "?"
    dump_patches = False  # read by torch's legacy reader when it compares saved source code

    def __init__(self, *args, **kwargs):
        raise UnsafePickleError(f"{self.pickled_name}: the checkpoint calls the module class, which is not allowed")

    def __setstate__(self, state):
        if not isinstance(state, dict):
            raise UnsafePickleError(f"{self.pickled_name}: expected a dict of attributes, got {type(state).__name__}")
        object.__setattr__(self, "state", state)

    def __reduce__(self):
        raise TypeError("a stand-in of the dVAE loader cannot be pickled")


# (module, name) of every module class the official files reference -> our stand-in class.
_MODULE_CLASSES = [
    ("dall_e.encoder", "Encoder"),
    ("dall_e.encoder", "EncoderBlock"),
    ("dall_e.decoder", "Decoder"),
    ("dall_e.decoder", "DecoderBlock"),
    ("dall_e.utils", "Conv2d"),
    ("torch.nn.modules.container", "Sequential"),
    ("torch.nn.modules.activation", "ReLU"),
    ("torch.nn.modules.linear", "Identity"),
    ("torch.nn.modules.pooling", "MaxPool2d"),
    ("torch.nn.modules.upsampling", "Upsample"),
]
_STANDINS = {
    key: type(f"Pickled_{key[1]}", (_PickledModule,), {"pickled_name": ".".join(key), "__slots__": ("state",)})
    for key in _MODULE_CLASSES
}


def _allowed_globals() -> dict[tuple[str, str], object]:
    allowed: dict[tuple[str, str], object] = dict(_STANDINS)
    allowed[("collections", "OrderedDict")] = OrderedDict
    allowed[("builtins", "set")] = set
    allowed[("torch", "device")] = torch.device
    for name in ("_rebuild_tensor", "_rebuild_tensor_v2", "_rebuild_parameter"):
        if hasattr(torch._utils, name):
            allowed[("torch._utils", name)] = getattr(torch._utils, name)
    # Typed storages (torch.FloatStorage, ...): torch's own find_class wrapper answers these names with a
    # dtype marker before ours is consulted; listed for pickles read by this unpickler directly.
    for name in ("FloatStorage", "HalfStorage", "DoubleStorage", "BFloat16Storage", "LongStorage", "IntStorage"):
        allowed[("torch", name)] = getattr(torch, name)
    return allowed


_ALLOWED = _allowed_globals()


class RestrictedUnpickler(pickle.Unpickler):
    """pickle.Unpickler whose find_class answers only the dVAE checkpoints' globals (see the module doc)."""

    def find_class(self, module, name):
        key = (module, name)
        # Protocol 2 pickles name Python 2 modules (torch.save writes protocol 2: __builtin__.set).
        if key in _compat_pickle.NAME_MAPPING:
            key = _compat_pickle.NAME_MAPPING[key]
        elif module in _compat_pickle.IMPORT_MAPPING:
            key = (_compat_pickle.IMPORT_MAPPING[module], name)
        if key not in _ALLOWED:
            raise UnsafePickleError(
                f"refusing to load global {key[0]}.{key[1]}: the dVAE loader accepts only the classes OpenAI's "
                f"encoder.pkl / decoder.pkl reference (torch tensor rebuilders, dall_e and torch.nn module classes)"
            )
        return _ALLOWED[key]


def _restricted_load(file, **kwargs):
    return RestrictedUnpickler(file, **kwargs).load()


# What torch.load needs of a pickle_module: Unpickler, load and a __name__.
_pickle_module = types.ModuleType("dalle_fast_restricted_pickle")
_pickle_module.Unpickler = RestrictedUnpickler
_pickle_module.load = _restricted_load
_pickle_module.UnpicklingError = UnsafePickleError


def _refuse_torchscript(path) -> None:
    """torch.load hands TorchScript archives to torch.jit.load, which runs their code: refuse them first."""
    if zipfile.is_zipfile(path):
        with zipfile.ZipFile(path) as z:
            names = z.namelist()
        if any(n.split("/")[-1] == "constants.pkl" for n in names) or any("/code/" in n for n in names):
            raise UnsafePickleError(f"{path}: a TorchScript archive, not a pickled dVAE module")


def _read(path):
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"path: expected a file path, got {type(path).__name__}")
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"path: no such file: {path!r}")
    _refuse_torchscript(path)
    with warnings.catch_warnings():
        # The legacy format compares each module class's saved source with the class the unpickler
        # returned: our stand-ins have no source. Nothing to report.
        warnings.simplefilter("ignore", torch.serialization.SourceChangeWarning)
        warnings.filterwarnings("ignore", message="Couldn't retrieve source code")
        return torch.load(path, map_location="cpu", pickle_module=_pickle_module, weights_only=False, mmap=False)


# The stand-in tree -> our module ---------------------------------------------------------------------------


def _name(obj) -> str:
    return obj.pickled_name if isinstance(obj, _PickledModule) else type(obj).__name__


def _collect(obj, prefix: str, tensors: dict, kinds: dict, where: str) -> None:
    """Walks the stand-in tree: tensors by state_dict key, and each submodule's pickled class name."""
    if not isinstance(obj, _PickledModule):
        raise UnsafePickleError(f"{where}: {prefix or 'the root'} is a {type(obj).__name__}, expected a module")
    state = obj.state
    kinds[prefix] = (obj.pickled_name, state)
    for group in ("_parameters", "_buffers"):
        entries = state.get(group, {})
        if not isinstance(entries, dict):
            raise UnsafePickleError(f"{where}: {prefix}.{group} is a {type(entries).__name__}, expected a dict")
        for key, value in entries.items():
            if value is None:
                continue
            if not isinstance(value, torch.Tensor):
                raise UnsafePickleError(f"{where}: {prefix}.{key} is a {type(value).__name__}, expected a tensor")
            tensors[f"{prefix}.{key}" if prefix else key] = value.detach()
    children = state.get("_modules", {})
    if not isinstance(children, dict):
        raise UnsafePickleError(f"{where}: {prefix}._modules is a {type(children).__name__}, expected a dict")
    for key, child in children.items():
        _collect(child, f"{prefix}.{key}" if prefix else key, tensors, kinds, where)


_KINDS = {
    Encoder: "dall_e.encoder.Encoder",
    Decoder: "dall_e.decoder.Decoder",
    EncoderBlock: "dall_e.encoder.EncoderBlock",
    DecoderBlock: "dall_e.decoder.DecoderBlock",
    Conv2d: "dall_e.utils.Conv2d",
    nn.Sequential: "torch.nn.modules.container.Sequential",
    nn.ReLU: "torch.nn.modules.activation.ReLU",
    nn.Identity: "torch.nn.modules.linear.Identity",
    nn.MaxPool2d: "torch.nn.modules.pooling.MaxPool2d",
    nn.Upsample: "torch.nn.modules.upsampling.Upsample",
}


def _int_attr(state: dict, key: str, where: str) -> int:
    value = state.get(key)
    if isinstance(value, bool) or not isinstance(value, int):
        raise UnsafePickleError(f"{where}: expected an integer attribute {key!r}, got {value!r}")
    return value


def _convert(root, where: str, device) -> nn.Module:
    roots = ("dall_e.encoder.Encoder", "dall_e.decoder.Decoder")
    if not isinstance(root, _PickledModule) or root.pickled_name not in roots:
        raise UnsafePickleError(f"{where}: expected a pickled dall_e Encoder or Decoder, got {_name(root)}")
    state = root.state
    mixed = state.get("use_mixed_precision", True)
    mixed = mixed if isinstance(mixed, bool) else True
    try:
        if root.pickled_name == "dall_e.encoder.Encoder":
            keys = ("n_hid", "n_blk_per_group", "input_channels", "vocab_size")
            ours = Encoder(4, *(_int_attr(state, k, where) for k in keys), use_mixed_precision=mixed, device="meta")
        else:
            keys = ("n_init", "n_hid", "n_blk_per_group", "output_channels", "vocab_size")
            ours = Decoder(4, *(_int_attr(state, k, where) for k in keys), use_mixed_precision=mixed, device="meta")
    except ValueError as e:
        raise UnsafePickleError(f"{where}: hyperparameters the architecture does not accept: {e}") from None

    tensors: dict[str, torch.Tensor] = {}
    kinds: dict[str, tuple[str, dict]] = {}
    _collect(root, "", tensors, kinds, where)
    expected = {name: _KINDS.get(type(m), type(m).__name__) for name, m in ours.named_modules()}
    found = {name: kind for name, (kind, _) in kinds.items()}
    if expected != found:
        diff = sorted(set(expected.items()) ^ set(found.items()))[:6]
        raise UnsafePickleError(f"{where}: the module tree differs from the official architecture, e.g. {diff}")
    for name, module in ours.named_modules():
        saved = kinds[name][1]
        attrs = ("n_in", "n_out", "kw") if isinstance(module, Conv2d) else ()
        if isinstance(module, nn.MaxPool2d | nn.Upsample):
            attrs = tuple(a for a in ("kernel_size", "stride", "scale_factor", "mode") if a in saved)
        for attr in attrs:
            want = getattr(module, attr)
            if saved.get(attr) != want:
                raise UnsafePickleError(f"{where}: {name}.{attr} is {saved.get(attr)!r}, expected {want!r}")
    ours = ours.to_empty(device=device or "cpu")
    with torch.no_grad():
        ours.load_state_dict(tensors, strict=True)
    return ours


def load_openai_module(path, *, device=None) -> Encoder | Decoder:
    """One official checkpoint (a pickled dall_e.Encoder or dall_e.Decoder) -> our Encoder or Decoder.

    Raises UnsafePickleError when the file names anything outside the allowlist or is not a dVAE module.
    device: where the module's parameters go (default: CPU; the file's tensors are read to the CPU first).
    """
    root = _read(path)
    return _convert(root, os.fspath(path), device)


def load_openai_dvae(encoder_path, decoder_path, *, device=None) -> DiscreteVAE:
    """OpenAI's encoder.pkl and decoder.pkl -> a DiscreteVAE of our modules with their weights.

    Reads the files with a restricted unpickler (nothing in them is executed; see this module's doc) on any
    current torch. The parameters require grad (ready to fine-tune); wrap inference in torch.no_grad().
    """
    encoder = load_openai_module(encoder_path, device=device)
    decoder = load_openai_module(decoder_path, device=device)
    if not isinstance(encoder, Encoder):
        raise ValueError(f"encoder_path: {os.fspath(encoder_path)!r} holds a decoder, not an encoder")
    if not isinstance(decoder, Decoder):
        raise ValueError(f"decoder_path: {os.fspath(decoder_path)!r} holds an encoder, not a decoder")
    return DiscreteVAE(encoder, decoder)
