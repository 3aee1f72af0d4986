"""Configuration dataclasses that travel inside every checkpoint, ONNX file, engine and index.

Their ``from_dict`` constructors read values that come from files, so they check every field's
type and bounds and raise :class:`~fgh_deploy.errors.FghError` naming the field; callers add the
file name (``f"{file}: {exc}"``).
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import asdict, dataclass, field
from typing import Any

from .errors import FghError
from .utils import terminal_safe

#: Longest code fgh trains, stores or searches (the papers use 12 to 128 bits).
MAX_BITS = 4096
#: Largest square input an engine takes; bounds memory per image (3 × 1024² bytes = 3 MB uint8).
MAX_INPUT_SIZE = 1024
#: Smallest square input: the backbones downsample 32×, so below this the feature map is empty.
MIN_INPUT_SIZE = 32
#: Largest short side an image is resized to before the crop (twice the largest input).
MAX_RESIZE_SIZE = 2 * MAX_INPUT_SIZE
#: The resize interpolations torchvision applies to uint8 tensors.
INTERPOLATIONS = ("nearest", "nearest-exact", "bilinear", "bicubic")
#: Deepest JSON nesting fgh writes is 3 (metadata → preprocess → mean); this leaves room, and stops
#: a hostile ``[[[[...]]]]`` long before Python's recursion limit.
MAX_JSON_DEPTH = 32

_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")
# Strings (escapes included) are skipped when measuring nesting: brackets inside them do not nest.
_JSON_STRING_OR_BRACKET = re.compile(r'"(?:[^"\\]|\\.)*"|[\[\]{}]')


def parse_json_object(text: str | bytes, what: str) -> dict[str, Any]:
    """A JSON object read from a file, refused in one line when it is not one.

    Args:
        text: the JSON text.
        what: what it is, for the message (e.g. ``"engine header"``).

    Raises:
        FghError: ``"<what> is not valid JSON: ..."``, nested deeper than ``MAX_JSON_DEPTH``, or not
            an object; the caller prefixes the file name.
    """
    if isinstance(text, bytes):
        try:
            text = text.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise FghError(f"{what} is not UTF-8 ({exc.reason} at byte {exc.start})") from None
    depth = deepest = 0
    for match in _JSON_STRING_OR_BRACKET.finditer(text):
        token = match.group()
        if token in "[{":
            depth += 1
            deepest = max(deepest, depth)
        elif token in "]}":
            depth -= 1
    if deepest > MAX_JSON_DEPTH:
        raise FghError(f"{what} is nested {deepest} levels deep (at most {MAX_JSON_DEPTH}); not written by fgh")
    try:
        value = json.loads(text)
    except ValueError as exc:  # JSONDecodeError, and ValueError for numbers with too many digits
        raise FghError(f"{what} is not valid JSON ({terminal_safe(str(exc))[:160]})") from None
    if not isinstance(value, dict):
        raise FghError(f"{what} is a JSON {type(value).__name__}, not an object")
    return value


def _field(data: Any, section: str, key: str, default: Any = ...) -> Any:
    if not isinstance(data, dict):
        raise FghError(f"bad {section}: expected an object, got {type(data).__name__}")
    if key not in data:
        if default is ...:
            raise FghError(f"bad {section}: {key} is missing")
        return default
    return data[key]


def _int_field(data: Any, section: str, key: str, low: int, high: int) -> int:
    value = _field(data, section, key)
    # bool is an int subclass, and a float would be truncated silently: neither is a size.
    if not isinstance(value, int) or isinstance(value, bool) or not low <= value <= high:
        raise FghError(f"bad {section}.{key}: expected an integer in {low}..{high}, got {_show(value)}")
    return value


def _floats_field(data: Any, section: str, key: str, *, positive: bool) -> tuple[float, float, float]:
    value = _field(data, section, key)
    if (not isinstance(value, (list, tuple)) or len(value) != 3
            or not all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
                       and (v > 0 or not positive) for v in value)):
        kind = "positive finite numbers" if positive else "finite numbers"
        raise FghError(f"bad {section}.{key}: expected 3 {kind} (one per RGB channel), got {_show(value)}")
    return (float(value[0]), float(value[1]), float(value[2]))


def _name_field(data: Any, section: str, key: str) -> str:
    value = _field(data, section, key)
    if not isinstance(value, str) or not _NAME.fullmatch(value):
        raise FghError(f"bad {section}.{key}: expected a name (letters, digits, _ . -; at most 64), "
                       f"got {_show(value)}")
    return value


def _show(value: Any) -> str:
    """A value from a file, short and printable, for a message."""
    text = repr(value)
    return terminal_safe(text if len(text) <= 60 else text[:57] + "...")


@dataclass(frozen=True)
class PreprocessConfig:
    """How an image becomes the uint8 tensor an engine takes.

    Decode → RGB → resize the short side to ``resize_size`` → center-crop ``input_size``.
    ``mean``/``std`` (on the 0–1 scale) are applied *inside* the model, so every engine
    (PyTorch, ONNX, TensorRT) takes raw uint8 pixels.
    """

    input_size: int = 224
    resize_size: int = 256
    mean: tuple[float, float, float] = (0.485, 0.456, 0.406)
    std: tuple[float, float, float] = (0.229, 0.224, 0.225)
    interpolation: str = "bilinear"

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Any, section: str = "preprocess") -> "PreprocessConfig":
        """Rebuild from :meth:`to_dict`'s output, as read from a file.

        Args:
            data: the dict.
            section: its name in the file, for messages.

        Raises:
            FghError: ``"bad <section>.<field>: ..."`` for a missing field, a wrong type or a value
                out of bounds (``input_size`` in ``MIN_INPUT_SIZE..MAX_INPUT_SIZE``, ``resize_size``
                in ``input_size..MAX_RESIZE_SIZE``, three finite means, three positive finite stds,
                ``interpolation`` in ``INTERPOLATIONS``).
        """
        input_size = _int_field(data, section, "input_size", MIN_INPUT_SIZE, MAX_INPUT_SIZE)
        resize_size = _int_field(data, section, "resize_size", input_size, MAX_RESIZE_SIZE)
        interpolation = _field(data, section, "interpolation", "bilinear")
        if interpolation not in INTERPOLATIONS:
            raise FghError(f"bad {section}.interpolation: expected one of {', '.join(INTERPOLATIONS)}, "
                           f"got {_show(interpolation)}")
        return cls(input_size=input_size, resize_size=resize_size,
                   mean=_floats_field(data, section, "mean", positive=False),
                   std=_floats_field(data, section, "std", positive=True), interpolation=interpolation)


@dataclass(frozen=True)
class HashConfig:
    """Everything needed to rebuild a hashing model's architecture.

    Args:
        model: registered model name (``adsh``, ``a2net``, ``semicon``, ``agmh``).
        bits: code length k.
        backbone: backbone name (``resnet50``, ``resnet18``, ``efficientnet_lite0``).
        options: model-specific options (e.g. ``num_parts`` for A²-Net), JSON-serialisable.
    """

    model: str
    bits: int
    backbone: str = "resnet50"
    options: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {"model": self.model, "bits": self.bits, "backbone": self.backbone, "options": dict(self.options)}

    @classmethod
    def from_dict(cls, data: Any, section: str = "config") -> "HashConfig":
        """Rebuild from :meth:`to_dict`'s output, as read from a file.

        Args:
            data: the dict.
            section: its name in the file, for messages (``config`` in a checkpoint, ``model`` in
                ONNX metadata and engine headers).

        Raises:
            FghError: ``"bad <section>.<field>: ..."`` for a missing field or a wrong type; ``bits`` must
                be in ``1..MAX_BITS``, ``model`` and ``backbone`` names, ``options`` an object with
                string keys. Whether the names are registered is checked when the model is built.
        """
        options = _field(data, section, "options", {})
        if not isinstance(options, dict) or not all(isinstance(key, str) for key in options):
            raise FghError(f"bad {section}.options: expected an object with string keys, got {_show(options)}")
        return cls(model=_name_field(data, section, "model"), bits=_int_field(data, section, "bits", 1, MAX_BITS),
                   backbone=_name_field(data, section, "backbone"), options=dict(options))
