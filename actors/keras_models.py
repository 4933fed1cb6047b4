"""Keras model files (nsfw-detector's weights, a .h5 file or a SavedModel folder), checked before
they load: refused if they would run code, and, for a .h5 file, built from its config alone so that
a layer config that does not deserialize is one line naming `safety.model` (on the driver, before
any worker starts) rather than a traceback from a worker.

The driver runs these checks where safety.model is a local path and tf-keras is installed; every
worker runs them again on its own copy before `load_model`.
"""

from __future__ import annotations

import functools
import json
import os
import re
from pathlib import Path

from sdfleet.actors.logs import native_start_up_quiet
from sdfleet.actors.model_files import check_keras_file_format
from sdfleet.schemas.errors import ModelLoadError, UserError


def import_tensorflow():
    """TensorFlow with tf-keras (nsfw-detector 1.1.1 needs Keras 2, chosen before TensorFlow loads),
    kept off the GPU (it maps almost all GPU memory at start, which torch needs), without its native
    start-up lines."""
    os.environ.setdefault("TF_USE_LEGACY_KERAS", "1")
    with native_start_up_quiet():
        import tensorflow as tf

        tf.config.set_visible_devices([], "GPU")
    return tf


class UnsafeModelError(UserError):
    """Detector weights that would run code when they load, or that are not the pinned file."""


# Keras model containers: their configs hold further layers, which are checked too.
KERAS_CONTAINERS = ("Functional", "Sequential", "Model")


def check_keras_model(path: str | Path) -> None:
    """Refuse a Keras model (.h5 file or SavedModel folder) that would run code while it loads.

    tf-keras' legacy loaders ignore `safe_mode`: a Lambda layer's marshalled bytecode, or a function
    it names (`os.system`), runs inside `load_model` (CVE-2025-9905). So the model's config is read
    here without building anything (h5py for .h5; the SavedModel's keras_metadata.pb) and every
    class it names, nested models included, must be one of Keras' own, and none a Lambda layer.
    ProtectAI's modelscan checks only the top-level layers of an .h5 and no class names, so a
    Lambda in a nested model passes it; modelaudit pulls in telemetry and pins numpy.
    """
    path = Path(path)
    for where, class_name in _named_classes(_keras_configs(path)):
        if class_name == "Lambda":
            raise UnsafeModelError(
                f"safety.model {path}: {where} is a Lambda layer, whose code would run when the model loads; "
                "sdfleet refuses such models. Use the detector's published weights, or re-save the model "
                "without Lambda layers"
            )
        if class_name not in _keras_builtin_classes():
            raise UnsafeModelError(
                f"safety.model {path}: {where} is of class {class_name!r}, which is not one of Keras' built-in "
                "classes; custom classes run their own code when the model loads, so sdfleet refuses them"
            )


def _keras_configs(path: Path) -> list[dict]:
    """The model configs a .h5 file or a SavedModel folder holds, as JSON, read without building layers."""
    if path.is_dir():
        from tf_keras.protobuf import saved_metadata_pb2

        metadata = path / "keras_metadata.pb"
        if not metadata.is_file():
            raise UnsafeModelError(
                f"safety.model {path}: a SavedModel folder without keras_metadata.pb; sdfleet "
                "cannot inspect it before loading, so it refuses it"
            )
        saved = saved_metadata_pb2.SavedMetadata()
        saved.ParseFromString(metadata.read_bytes())
        return [json.loads(node.metadata) for node in saved.nodes if node.metadata]
    import h5py

    check_keras_file_format(path)  # h5py aborts the process on some files that are not HDF5
    with h5py.File(path, "r") as f:
        raw = f.attrs.get("model_config")
    if raw is None:
        raise UnsafeModelError(
            f"safety.model {path}: no model_config in the file; sdfleet loads whole Keras "
            "models (.h5 saved with model.save) only"
        )
    return [json.loads(raw.decode() if isinstance(raw, bytes) else raw)]


def _named_classes(node, path: tuple[str, ...] = ()) -> list[tuple[str, str]]:
    """('layer a/b/c', class name) for every `class_name` in a Keras config, depth first."""
    found = []
    if isinstance(node, dict):
        if isinstance(node.get("class_name"), str):
            config = node.get("config") if isinstance(node.get("config"), dict) else {}
            path = (*path, str(config.get("name") or node.get("name") or node["class_name"]))
            found.append((f"layer {'/'.join(path)!r}", node["class_name"]))
        for key, value in node.items():
            if key != "class_name":
                found += _named_classes(value, path)
    elif isinstance(node, list):
        for value in node:
            found += _named_classes(value, path)
    return found


@functools.cache
def _keras_builtin_classes() -> frozenset[str]:
    """The class names Keras itself can deserialize: its layers, initializers, regularizers,
    constraints and model containers."""
    import tf_keras

    # Shapes, tuples and tensor specs are data in a config (the last two appear in SavedModel metadata).
    names = set(KERAS_CONTAINERS) | {"__tuple__", "TensorShape", "TypeSpec"}
    for module in (
        tf_keras.layers,
        tf_keras.initializers,
        tf_keras.regularizers,
        tf_keras.constraints,
        tf_keras.mixed_precision,
    ):
        names.update(n for n, v in vars(module).items() if isinstance(v, type))
    return frozenset(names)


def check_keras_builds(path: str | Path) -> None:
    """Build a .h5 file's model from its config, without its weights, as `load_model` would first:
    a layer config that does not deserialize (a damaged file, another Keras' format) is refused in
    one line. Only after `check_keras_model`: Keras' own classes, no Lambda, so building runs no
    code from the file. A SavedModel folder is left to the worker's load."""
    path = Path(path)
    if path.is_dir():
        return
    (config,) = _keras_configs(path)
    import_tensorflow()
    import tf_keras

    try:
        tf_keras.models.model_from_json(json.dumps(config))
    except Exception as e:  # whatever Keras raises, said in one line
        raise keras_load_error(path, e) from e


def keras_load_error(path: str | Path, e: BaseException) -> ModelLoadError:
    """What a Keras model that does not load says: the layer and class Keras named, and its cause,
    in one line (Keras' own message spans lines and quotes the layer's whole config)."""
    text = str(e).strip()
    lines = [line for line in text.splitlines() if line.strip()]
    cause = lines[-1].removeprefix("Exception encountered: ") if lines else type(e).__name__
    found = re.search(r"deserializing class '([^']+)' using config=\{'name': '([^']+)'", text)
    where = f"layer {found[2]!r} (class {found[1]!r})" if found else "the model"
    return ModelLoadError(
        f"safety.model {path}: {where} does not deserialize under tf-keras "
        f"({type(e).__name__}: {cause}); the file is damaged or from another Keras: use the "
        "detector's published weights, or re-save the model with tf-keras 2"
    )
