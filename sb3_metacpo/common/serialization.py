"""Saving and loading models as data, never as code.

An archive is a zip file with exactly two members:

* ``metadata.json``: the format and its version, the algorithm's name, its constructor arguments, the policy class
  and the spaces (as plain descriptions), the task distribution (name and parameters), the counters, the adaptation
  history and every random stream (numpy, Python, the task stream, the samplers' episode streams);
* ``tensors.pt``: the policy's parameters and buffers (observation statistics, critics), the critic optimiser's
  state, the adapted parameters and torch's RNG state, read back with ``torch.load(..., weights_only=True)``.

Classes (the policy, activation functions, optimisers, VecEnv classes) are written as names and looked up in a
registry of allowed classes (:func:`register_class` adds one); nothing in an archive is unpickled. SB3's own format
keeps constructor arguments it cannot write as JSON as cloudpickle, which runs code when loaded: archives in that
format are refused, with the way to convert one you trust (:func:`convert_sb3_archive`).

A policy saved alone (``CPOPolicy.save``, SB3's policy-level API) is an archive of the same two members:
``metadata.json`` holds ``"content": "policy"``, the policy class, its spaces and constructor arguments (written by
the same :func:`encode_value` as the algorithms' ``policy_kwargs``) and its optimiser's learning rate;
``tensors.pt`` its state dict and the actor override (the adapted parameters, if any). SB3's own policy files
(``BaseModel.save``: a pickled dict whose constructor arguments are pickled objects) are refused before anything
in them is unpickled.

Archives are written atomically (a temporary file in the same folder, then ``os.replace``): a process killed while
saving leaves the previous file intact.
"""

from __future__ import annotations

import io
import json
import math
import os
import pickle
import random
import tempfile
import zipfile
import zlib
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import gymnasium as gym
import numpy as np
import torch as th

if TYPE_CHECKING:  # the algorithms and the policy import this module
    from sb3_metacpo.common.policies import CPOPolicy
    from sb3_metacpo.common.safe_algorithm import SafeAlgorithmMixin

    SelfPolicy = TypeVar("SelfPolicy", bound=CPOPolicy)

FORMAT = "sb3_metacpo"
FORMAT_VERSION = 1
METADATA = "metadata.json"
TENSORS = "tensors.pt"
_SB3_MEMBERS = ("data", "policy.pth", "pytorch_variables.pth")

_CLASSES: dict[str, type] = {}


def _qualified_name(cls: type) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


def register_class(cls: type) -> type:
    """Allow ``cls`` in archives (a policy subclass, an activation function, an optimiser...): it is written as its
    qualified name and looked up by that name when loading. Usable as a class decorator."""
    if not isinstance(cls, type):
        raise TypeError(f"register_class takes a class, got {cls!r}")
    _CLASSES[_qualified_name(cls)] = cls
    return cls


def lookup_class(name: Any) -> type:
    """The registered class called ``name``; a ``ValueError`` for anything else (nothing is imported)."""
    if not isinstance(name, str) or name not in _CLASSES:
        raise ValueError(
            f"the archive names the class {name!r}, which is not in the registry of allowed classes; if you trust "
            "it, register it with sb3_metacpo.common.serialization.register_class before loading"
        )
    return _CLASSES[name]


def _register_defaults() -> None:
    from stable_baselines3.common.torch_layers import FlattenExtractor
    from stable_baselines3.common.vec_env import DummyVecEnv, SubprocVecEnv

    from sb3_metacpo.common.envs import LeanDummyVecEnv, ReportingSubprocVecEnv
    from sb3_metacpo.common.flat_adam import FlatAdam
    from sb3_metacpo.common.policies import CPOPolicy

    # torch's activations without parameters or random draws, all element-wise (what CPOPolicy accepts)
    activation_names = (
        "Tanh ReLU ELU LeakyReLU SiLU GELU Sigmoid Softplus Mish SELU CELU ReLU6 Hardtanh Hardswish Hardsigmoid "
        "Softsign Tanhshrink LogSigmoid Hardshrink Softshrink Identity"
    )
    activations = tuple(getattr(th.nn, name) for name in activation_names.split())
    optimizers = (FlatAdam, th.optim.Adam, th.optim.AdamW, th.optim.SGD, th.optim.RMSprop)
    vec_envs = (DummyVecEnv, LeanDummyVecEnv, SubprocVecEnv, ReportingSubprocVecEnv)
    for cls in (CPOPolicy, FlattenExtractor, *vec_envs, *activations, *optimizers):
        register_class(cls)


# --- plain values -----------------------------------------------------------------------------------------------
def encode_value(value: Any, where: str) -> Any:
    """``value`` as JSON: numbers, strings, None, lists, string-keyed dicts and registered classes
    (``{"__class__": name}``); a ``TypeError`` naming ``where`` for anything else."""
    if value is None or isinstance(value, (bool, str)):
        return value
    if isinstance(value, np.bool_):
        return bool(value)
    if isinstance(value, (int, np.integer)):
        return int(value)
    if isinstance(value, (float, np.floating)):
        return float(value)
    if isinstance(value, (list, tuple)):
        return [encode_value(item, f"{where}[{index}]") for index, item in enumerate(value)]
    if isinstance(value, Mapping):
        if not all(isinstance(key, str) for key in value):
            raise TypeError(f"{where} has keys that are not strings; it cannot be saved as data")
        if "__class__" in value:
            raise TypeError(f"{where} has a key '__class__', which the format reserves")
        return {key: encode_value(item, f"{where}[{key!r}]") for key, item in value.items()}
    if isinstance(value, type):
        name = _qualified_name(value)
        if _CLASSES.get(name) is not value:
            raise TypeError(
                f"{where} = {name} is not in the registry of allowed classes: register it with "
                "sb3_metacpo.common.serialization.register_class to save it"
            )
        return {"__class__": name}
    raise TypeError(f"{where} = {value!r} ({type(value).__name__}) cannot be saved as data")


def decode_value(value: Any) -> Any:
    """Inverse of :func:`encode_value` (classes looked up in the registry)."""
    if isinstance(value, list):
        return [decode_value(item) for item in value]
    if isinstance(value, dict):
        if set(value) == {"__class__"}:
            return lookup_class(value["__class__"])
        return {key: decode_value(item) for key, item in value.items()}
    return value


def encode_space(space: gym.Space) -> dict[str, Any]:
    """A Box space as a plain description."""
    if not isinstance(space, gym.spaces.Box):
        raise TypeError(f"only Box spaces are saved, got {space}")
    return {
        "type": "Box",
        "low": space.low.tolist(),
        "high": space.high.tolist(),
        "shape": list(space.shape),
        "dtype": str(space.dtype),
    }


def decode_space(description: Any) -> gym.spaces.Box:
    """The Box space of :func:`encode_space`'s description."""
    if not isinstance(description, dict) or description.get("type") != "Box":
        raise ValueError(f"the archive describes an unsupported space: {description!r}")
    if description.get("dtype") is None:  # numpy read None as float64
        raise ValueError(f"the archive describes a Box without its dtype: {description!r}")
    dtype = np.dtype(description["dtype"])
    if dtype.kind not in "fiu":
        raise ValueError(f"the archive describes a Box of dtype {dtype}; only number Boxes are supported")
    low = np.asarray(description["low"], dtype=dtype).reshape(description["shape"])
    high = np.asarray(description["high"], dtype=dtype).reshape(description["shape"])
    if np.isnan(low).any() or np.isnan(high).any() or (low > high).any():  # a NaN action bound made predict NaN
        raise ValueError(f"the archive describes a Box whose bounds are NaN or low > high: {description!r}")
    return gym.spaces.Box(low, high, tuple(description["shape"]), dtype)  # type: ignore[arg-type]


# --- random streams ---------------------------------------------------------------------------------------------
def global_rng_state() -> tuple[dict[str, Any], th.Tensor]:
    """numpy's and Python's global RNG states (JSON) and torch's CPU RNG state (a tensor)."""
    state = np.random.get_state(legacy=True)
    if not isinstance(state, tuple):  # only when numpy's global generator is not a Mersenne Twister
        raise TypeError(f"numpy's global random state is not a legacy Mersenne Twister state: {type(state).__name__}")
    kind, keys, position, has_gauss, gauss = state
    numpy_state = [kind, keys.tolist(), int(position), int(has_gauss), float(gauss)]
    version, internal, gauss_next = random.getstate()
    return {"numpy": numpy_state, "python": [version, list(internal), gauss_next]}, th.get_rng_state()


def set_global_rng_state(state: Mapping[str, Any], torch_state: th.Tensor) -> None:
    """Restore what :func:`global_rng_state` returned."""
    kind, keys, position, has_gauss, gauss = state["numpy"]
    np.random.set_state((kind, np.asarray(keys, dtype=np.uint32), position, has_gauss, gauss))
    version, internal, gauss_next = state["python"]
    random.setstate((version, tuple(internal), gauss_next))
    th.set_rng_state(torch_state.to("cpu", th.uint8))


def check_rng_state(state: Any, torch_state: Any) -> None:
    """Raise a ``ValueError`` unless :func:`set_global_rng_state` would accept these states (tried on scratch
    generators: nothing global changes)."""
    try:
        kind, keys, position, has_gauss, gauss = state["numpy"]
        np.random.RandomState().set_state((kind, np.asarray(keys, dtype=np.uint32), position, has_gauss, gauss))
        version, internal, gauss_next = state["python"]
        random.Random().setstate((version, tuple(internal), gauss_next))
        th.Generator().set_state(torch_state.to("cpu", th.uint8))
    except (KeyError, TypeError, ValueError, OverflowError, RuntimeError, AttributeError) as error:
        raise ValueError(f"the saved random states are not valid: {error}") from error


# --- archives ---------------------------------------------------------------------------------------------------
def _checked_path(path: Any) -> str | os.PathLike[str]:
    """``path`` if it is a path (a ``TypeError`` saying what is accepted otherwise, e.g. for a file object)."""
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(
            f"save and load take a path (str or os.PathLike), got {type(path).__name__}: archives are written "
            "atomically to a file, not to a file object; save to a temporary file and copy its bytes instead"
        )
    return path


def archive_path(path: str | os.PathLike[str]) -> Path:
    """``path`` with SB3's ``.zip`` suffix added when it has none."""
    path = Path(_checked_path(path))
    return path if path.suffix else path.with_suffix(".zip")


def write_archive(path: str | os.PathLike[str], metadata: Mapping[str, Any], tensors: Mapping[str, Any]) -> Path:
    """Write an archive atomically: into a temporary file of the same folder, synced, then renamed over ``path``."""
    path = archive_path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    buffer = io.BytesIO()
    th.save(dict(tensors), buffer)
    text = json.dumps({"format": FORMAT, "format_version": FORMAT_VERSION, **metadata}, indent=1, allow_nan=True)
    descriptor, temporary = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    umask = os.umask(0)
    os.umask(umask)
    try:
        os.chmod(temporary, 0o666 & ~umask)  # a plain file's mode (mkstemp makes it 0600)
        with os.fdopen(descriptor, "wb") as file:
            with zipfile.ZipFile(file, "w", zipfile.ZIP_DEFLATED) as archive:
                archive.writestr(METADATA, text)
                archive.writestr(TENSORS, buffer.getvalue())
            file.flush()
            os.fsync(file.fileno())
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise
    return path


class ArchiveError(ValueError):
    """An archive that is not a valid sb3_metacpo archive, or holds something other than data."""


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """A JSON object whose keys are all different (json keeps the last of duplicated ones silently)."""
    keys = [key for key, _ in pairs]
    duplicated = sorted({key for key in keys if keys.count(key) > 1})
    if duplicated:
        raise ValueError(f"duplicated keys {duplicated}")
    return dict(pairs)


def read_archive(path: str | os.PathLike[str], device: th.device | str = "cpu") -> tuple[dict[str, Any], dict[str, Any]]:
    """The metadata and tensors of an archive, after checking that it holds exactly the two members of the format,
    that the metadata is JSON of this format and that the tensors load with ``weights_only=True``."""
    path = Path(_checked_path(path))
    if not path.exists() and archive_path(path).exists():
        path = archive_path(path)
    if not path.exists():
        raise FileNotFoundError(f"no saved model at {path}")
    if not path.is_file():
        raise ArchiveError(f"{path} is not a file")
    try:
        archive = zipfile.ZipFile(path)
    except zipfile.BadZipFile as error:
        raise ArchiveError(f"{path} is not a zip archive of a saved model") from error
    with archive:
        members = archive.namelist()
        names = set(members)
        if len(members) != len(names):  # zipfile reads the last of repeated names: a scanner may see another one
            raise ArchiveError(f"{path} is not a valid archive: it repeats a member ({sorted(members)})")
        if names != {METADATA, TENSORS}:
            if METADATA not in names and any(name in names for name in _SB3_MEMBERS):
                raise ArchiveError(
                    f"{path} is in Stable-Baselines3's format, whose 'data' may hold pickled code that loading would "
                    "run; it is not loaded. If you trust the file, convert it once with "
                    "sb3_metacpo.common.serialization.convert_sb3_archive(path, output, Algorithm)"
                )
            raise ArchiveError(
                f"{path} is not a valid archive: it holds {sorted(names)}, expected exactly {[METADATA, TENSORS]}"
            )
        try:
            metadata = json.loads(archive.read(METADATA).decode("utf-8"), object_pairs_hook=_unique_keys)
        except (zipfile.BadZipFile, zlib.error, UnicodeDecodeError, ValueError, RecursionError) as error:
            raise ArchiveError(f"{path}: {METADATA} is not valid JSON of a saved model ({error})") from error
        if not isinstance(metadata, dict) or metadata.get("format") != FORMAT:
            raise ArchiveError(f"{path}: {METADATA} does not describe an {FORMAT} archive")
        if metadata.get("format_version") != FORMAT_VERSION:
            raise ArchiveError(
                f"{path} has format version {metadata.get('format_version')!r}; this version of {FORMAT} reads "
                f"version {FORMAT_VERSION}"
            )
        try:
            tensors = th.load(io.BytesIO(archive.read(TENSORS)), map_location=device, weights_only=True)
        except (
            pickle.UnpicklingError,
            RuntimeError,
            EOFError,
            AttributeError,
            TypeError,
            ValueError,
            zipfile.BadZipFile,
            zlib.error,
        ) as error:
            raise ArchiveError(
                f"{path}: {TENSORS} holds something other than plain tensors and containers; refused without "
                f"running it ({type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''})"
            ) from error
    if not isinstance(tensors, dict):
        raise ArchiveError(f"{path}: {TENSORS} does not hold a dictionary of tensors")
    overlapping = _overlapping_tensor(tensors, "")
    if overlapping is not None:  # a few bytes that any check or copy would expand to gigabytes
        raise ArchiveError(
            f"{path}: {TENSORS} holds {overlapping!r}, a tensor with more elements than its storage (stride 0, e.g. "
            "expand()), which save never writes; refused"
        )
    return metadata, tensors


def _overlapping_tensor(value: Any, where: str) -> str | None:
    """The key path of the first tensor in ``value`` (nested dicts, lists, tuples) whose elements need more bytes
    than its storage holds: elements that share memory (a stride of 0)."""
    return _first_tensor(value, where, lambda t: t.numel() * t.element_size() > t.untyped_storage().nbytes())


def check_finite_tensors(source: object, entries: Mapping[str, Any], where: str) -> None:
    """An :class:`ArchiveError` where a floating tensor in ``entries`` (nested mappings and sequences: parameters,
    statistics, an optimiser's state) holds a NaN or an inf. For what ``save`` never writes non-finite: the policy's
    parameters and observation statistics, the adapted parameters, the critics' optimiser state (a policy's own buffers
    may hold infinities, e.g. an unbounded space's bounds, and are not checked)."""
    bad = _non_finite_tensor(entries, where)
    if bad is not None:
        raise ArchiveError(f"{source}: {TENSORS} holds non-finite values in {bad!r}, which no saved model has; refused")


def check_optimizer_settings(source: object, param_groups: Any) -> None:
    """An :class:`ArchiveError` unless an optimiser's saved ``param_groups`` are a list of mappings whose numbers
    (learning rate, betas, eps, weight decay...) are finite: a NaN eps loaded, and the next ``learn`` failed with a
    ``FloatingPointError`` that named the learning rate."""
    if not (isinstance(param_groups, list) and all(isinstance(group, Mapping) for group in param_groups)):
        raise ArchiveError(f"{source}: the optimiser's param_groups are not a list of mappings; refused")
    for index, group in enumerate(param_groups):
        for key, value in group.items():
            values = value if isinstance(value, (list, tuple)) and key != "params" else [value]
            for number in values:
                if isinstance(number, float) and not math.isfinite(number):
                    raise ArchiveError(f"{source}: the optimiser's {key} ({value!r}, group {index}) is not finite; refused")


def check_optimizer_state_shapes(source: object, optimizer: th.optim.Optimizer, state: Any) -> None:
    """An :class:`ArchiveError` where a saved optimiser state's tensor (Adam's moments: everything but ``step``) has
    another shape than its parameter: it loaded, and the next ``learn`` failed on a broadcast deep inside torch."""
    parameters = [parameter for group in optimizer.param_groups for parameter in group["params"]]
    if not isinstance(state, Mapping):
        raise ArchiveError(f"{source}: the optimiser's state is not a mapping; refused")
    for index, entry in state.items():
        if not (isinstance(index, int) and 0 <= index < len(parameters) and isinstance(entry, Mapping)):
            raise ArchiveError(f"{source}: the optimiser's state has an entry {index!r} of no parameter; refused")
        for key, value in entry.items():
            if key != "step" and isinstance(value, th.Tensor) and value.shape != parameters[index].shape:
                raise ArchiveError(
                    f"{source}: the optimiser's {key} of parameter {index} has shape {tuple(value.shape)} where the "
                    f"parameter's is {tuple(parameters[index].shape)}; refused"
                )


def policy_values(policy: th.nn.Module, state: Mapping[str, Any]) -> dict[str, Any]:
    """The entries of a policy's state dict that hold its parameters and its observation statistics."""
    names = {name for name, _ in policy.named_parameters()} | {"obs_mean", "obs_var", "obs_count"}
    return {name: value for name, value in state.items() if name in names}


def check_policy_state(source: object, policy: th.nn.Module, state: Mapping[str, Any]) -> None:
    """An :class:`ArchiveError` where a policy's saved state holds what no saved model has: non-finite parameters or
    observation statistics (:func:`check_finite_tensors`), or a negative observation variance or count (``predict``
    then acted with NaN and blamed the env's observations)."""
    check_finite_tensors(source, policy_values(policy, state), "policy")
    for name in ("obs_var", "obs_count"):
        value = state.get(name)
        if isinstance(value, th.Tensor) and value.is_floating_point() and bool((value < 0).any()):
            raise ArchiveError(f"{source}: {TENSORS} holds a negative policy/{name}, which no saved model has; refused")


def _non_finite_tensor(value: Any, where: str) -> str | None:
    """The key path of the first floating tensor in ``value`` (nested dicts, lists, tuples) with a NaN or an inf."""
    return _first_tensor(value, where, lambda tensor: tensor.is_floating_point() and not bool(th.isfinite(tensor).all()))


def _first_tensor(value: Any, where: str, found: Callable[[th.Tensor], bool]) -> str | None:
    """The key path (``a/b/0``) of the first tensor in ``value`` (nested dicts, lists, tuples) for which ``found``."""
    if isinstance(value, th.Tensor):
        return where if found(value) else None
    if isinstance(value, dict):
        items: Any = value.items()
    elif isinstance(value, (list, tuple)):
        items = enumerate(value)
    else:
        return None
    for key, item in items:
        path = _first_tensor(item, f"{where}/{key}" if where else str(key), found)
        if path is not None:
            return path
    return None


def convert_sb3_archive(
    path: str | os.PathLike[str], output: str | os.PathLike[str], algorithm: type[SafeAlgorithmMixin]
) -> Path:
    """Convert a model saved in Stable-Baselines3's format (sb3_metacpo before the safe format) into the safe one.

    This runs SB3's loader, which unpickles the archive's ``data``: only do it for a file you trust.

    :param path: the SB3-format archive
    :param output: where to write the converted archive
    :param algorithm: its class (``MetaCPO``, ``MetaTRPO`` or ``CPO``)
    """
    model = algorithm.load_sb3_archive(path)
    return model.save(output)


# --- a policy saved alone ---------------------------------------------------------------------------------------
#: ``metadata["content"]`` of a policy saved alone (an algorithm's archive has none; it names its ``algorithm``)
POLICY_CONTENT = "policy"
#: the policy's constructor arguments that are not written with the others: the spaces (written as descriptions)
#: and the learning-rate schedule (its current value is written; SB3's is a dummy schedule)
_POLICY_ARGUMENTS_APART = ("observation_space", "action_space", "lr_schedule")


def _sb3_policy_file(path: Path) -> bool:
    """Whether ``path`` is a file written by ``torch.save`` (SB3's ``BaseModel.save``), i.e. a pickle: torch's zip
    layout (a ``data.pkl`` member) or its legacy format (a raw pickle). Only the zip directory or the first byte is
    read; nothing is unpickled."""
    if zipfile.is_zipfile(path):
        with zipfile.ZipFile(path) as archive:
            return any(name == "data.pkl" or name.endswith("/data.pkl") for name in archive.namelist())
    with open(path, "rb") as file:
        return file.read(1) == b"\x80"  # pickle's PROTO opcode, how torch's legacy format starts


def save_policy(policy: CPOPolicy, path: str | os.PathLike[str]) -> Path:
    """Write ``policy`` (and its actor override, the adapted parameters, if one is set) as an archive; see
    :meth:`~sb3_metacpo.common.policies.CPOPolicy.save`."""
    arguments = policy._get_constructor_parameters()
    override = policy._actor_override
    metadata = {
        "content": POLICY_CONTENT,
        "policy_class": encode_value(type(policy), "policy class")["__class__"],
        "observation_space": encode_space(arguments["observation_space"]),
        "action_space": encode_space(arguments["action_space"]),
        "constructor_arguments": encode_value(
            {key: value for key, value in arguments.items() if key not in _POLICY_ARGUMENTS_APART}, "policy argument"
        ),
        "learning_rate": float(policy.optimizer.param_groups[0]["lr"]),
    }
    tensors = {
        "policy": policy.state_dict(),
        "actor_override": {} if override is None else {name: value.detach() for name, value in override.items()},
    }
    return write_archive(path, metadata, tensors)


def load_policy(cls: type[SelfPolicy], path: str | os.PathLike[str], device: th.device | str = "auto") -> SelfPolicy:
    """The policy of an archive written by :func:`save_policy`, running no code from the file; see
    :meth:`~sb3_metacpo.common.policies.CPOPolicy.load`."""
    from stable_baselines3.common.utils import ConstantSchedule, get_device

    file = Path(_checked_path(path))
    if not file.exists() and archive_path(file).exists():
        file = archive_path(file)
    if file.is_file() and _sb3_policy_file(file):
        raise ArchiveError(
            f"{file} was written by Stable-Baselines3's BaseModel.save (a torch pickle, whose constructor arguments are "
            "pickled objects: loading them would run any code the file holds); it is not loaded. Re-save the policy "
            "with this version (policy.save(path) writes JSON and tensors only), or load the whole model with its "
            "algorithm's load (e.g. MetaCPO.load(model_path).policy). A file you trust can be read with "
            f"{cls.__name__}.load_sb3_file(path), which unpickles it"
        )
    metadata, tensors = read_archive(file, "cpu")
    if metadata.get("content") != POLICY_CONTENT:
        algorithm = metadata.get("algorithm")
        raise ArchiveError(
            f"{file} holds a {algorithm} model, not a policy saved alone: load it with {algorithm}.load(path) and use "
            "its .policy"
        )
    try:
        policy_class = lookup_class(metadata["policy_class"])
        observation_space = decode_space(metadata["observation_space"])
        action_space = decode_space(metadata["action_space"])
        arguments = decode_value(metadata["constructor_arguments"])
        learning_rate = metadata["learning_rate"]
        state, override = tensors["policy"], tensors["actor_override"]
    except KeyError as error:
        raise ArchiveError(f"{file}: the policy file has no {error}") from error
    except (ValueError, TypeError) as error:  # an unregistered class name, an unsupported or malformed space
        raise ArchiveError(f"{file}: {error}") from error
    if not issubclass(policy_class, cls):
        raise ArchiveError(f"{file} holds a {policy_class.__name__}, which is not a {cls.__name__}")
    if not isinstance(arguments, dict) or set(arguments) & set(_POLICY_ARGUMENTS_APART):
        raise ArchiveError(f"{file}: the policy's constructor arguments are not a mapping of the other arguments")
    if isinstance(learning_rate, bool) or not isinstance(learning_rate, (int, float)) or not 0 <= learning_rate < np.inf:
        raise ArchiveError(f"{file}: the learning rate must be a finite number >= 0, got {learning_rate!r}")
    if not (isinstance(state, dict) and isinstance(override, dict)):
        raise ArchiveError(f"{file}: the policy's tensors are not mappings")
    if not all(isinstance(value, th.Tensor) for value in [*state.values(), *override.values()]):
        raise ArchiveError(f"{file}: the policy's state dict or actor override holds something other than tensors")
    try:
        policy = policy_class(observation_space, action_space, ConstantSchedule(float(learning_rate)), **arguments)
        check_policy_state(file, policy, state)
        check_finite_tensors(file, override, "actor_override")
        policy.load_state_dict(state)
        if override:
            check_actor_override(policy.actor_params(), override)
    except (TypeError, ValueError, RuntimeError, OverflowError) as error:
        raise ArchiveError(f"{file} does not describe a consistent {policy_class.__name__}: {error}") from error
    device = get_device(device)
    policy = policy.to(device)
    policy.set_actor_override({name: value.to(device) for name, value in override.items()} if override else None)
    return policy  # a subclass of cls, checked above


def check_actor_override(own: Mapping[str, th.Tensor], override: Mapping[str, th.Tensor]) -> None:
    """A ``ValueError`` unless ``override`` (adapted actor parameters) has exactly the actor's parameters ``own``, each
    of its shape and dtype: a bias cut to shape (1,) broadcast and acted silently otherwise."""
    if set(override) != set(own):
        raise ValueError(f"the actor override has parameters {sorted(override)}, the actor {sorted(own)}")
    for name, value in override.items():
        if value.shape != own[name].shape or value.dtype != own[name].dtype:
            raise ValueError(
                f"the actor override's {name} ({tuple(value.shape)}, {value.dtype}) does not match the actor's "
                f"({tuple(own[name].shape)}, {own[name].dtype})"
            )


_register_defaults()
