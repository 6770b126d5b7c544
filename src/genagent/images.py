"""Images: content-addressed references and stores, encoding, and size limits.

Trajectories never inline images. Every image a tool returns is validated (a readable image,
within the pixel and byte limits), hashed with SHA-256, and put in an :class:`ImageStore`; the
trajectory keeps an :class:`ImageRef` (hash, format, size) that can read the bytes back.
The same image stored twice is stored once.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import io
import os
import threading
import uuid
import warnings
from abc import ABC, abstractmethod
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final, Literal, TypeAlias, cast

from pydantic import BaseModel, ConfigDict, Field, PrivateAttr

from genagent.errors import InvalidImageError

if TYPE_CHECKING:
    from PIL import Image as PILImage

__all__ = [
    "DEFAULT_MAX_IMAGE_BYTES",
    "DEFAULT_MAX_IMAGE_PIXELS",
    "DirectoryImageStore",
    "ImageFormat",
    "ImageLike",
    "ImageRef",
    "ImageStore",
    "MemoryImageStore",
    "decode_base64_image",
    "encode_png",
    "inspect_image",
    "to_data_uri",
]

DEFAULT_MAX_IMAGE_PIXELS: Final = 64 * 1024 * 1024
"""Largest image accepted, in pixels (64 MP: well above any generator's output)."""

DEFAULT_MAX_IMAGE_BYTES: Final = 64 * 1024 * 1024
"""Largest encoded image accepted, in bytes."""

_EXTENSIONS: Final = {"png": "png", "jpeg": "jpg", "webp": "webp", "gif": "gif", "bmp": "bmp"}
_MIME: Final = {
    "png": "image/png",
    "jpeg": "image/jpeg",
    "webp": "image/webp",
    "gif": "image/gif",
    "bmp": "image/bmp",
}

ImageFormat = Literal["png", "jpeg", "webp", "gif", "bmp"]
"""The encoded formats a store accepts."""

ImageLike: TypeAlias = "PILImage.Image | bytes"
"""What tools may return as an image: a PIL image (encoded as PNG) or encoded bytes."""


class ImageRef(BaseModel):
    """A reference to an image in a content-addressed store.

    Two references are equal when they name the same bytes (same SHA-256). A reference returned
    by an agent run or by ``Trajectory.load`` is bound to its store and can read the image.

    Attributes:
        sha256: Hex SHA-256 of the encoded bytes.
        format: Encoded format, lower case (``"png"``, ``"jpeg"``, ``"webp"``, ...).
        width: Width in pixels.
        height: Height in pixels.
        nbytes: Size of the encoded bytes.
    """

    model_config = ConfigDict(frozen=True)

    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    format: ImageFormat
    width: int = Field(gt=0)
    height: int = Field(gt=0)
    nbytes: int = Field(gt=0)

    _store: ImageStore | None = PrivateAttr(default=None)

    @property
    def filename(self) -> str:
        """File name inside a store folder: ``<sha256>.<ext>``."""
        return f"{self.sha256}.{_EXTENSIONS.get(self.format, self.format)}"

    @property
    def mime_type(self) -> str:
        """MIME type of the encoded bytes."""
        return _MIME.get(self.format, f"image/{self.format}")

    @property
    def store(self) -> ImageStore | None:
        """The store this reference reads from, if bound."""
        return self._store

    def bind(self, store: ImageStore) -> ImageRef:
        """Bind this reference to ``store`` (in place) and return it."""
        self._store = store
        return self

    def read_bytes(self) -> bytes:
        """Return the encoded bytes.

        Raises:
            InvalidImageError: If the reference is not bound to a store, or the store lacks it.
        """
        if self._store is None:
            raise InvalidImageError(
                f"image {self.sha256[:12]} is not bound to an image store; read trajectories with "
                "Trajectory.load(folder) so that their images can be found"
            )
        return self._store.read(self)

    def open(self) -> PILImage.Image:
        """Decode the image with PIL (fully loaded; PNG text chunks are kept in ``.info``)."""
        from PIL import Image

        image = Image.open(io.BytesIO(self.read_bytes()))
        image.load()
        return image

    def save(self, path: str | os.PathLike[str]) -> Path:
        """Write the image to ``path``.

        The stored bytes are written unchanged when the suffix matches the stored format (or is
        missing); otherwise the image is re-encoded with PIL to the suffix's format.

        Returns:
            The path written.
        """
        target = Path(path)
        if not target.suffix:
            target = target.with_suffix("." + _EXTENSIONS.get(self.format, self.format))
        suffix = target.suffix.lower().lstrip(".")
        if suffix in {self.format, _EXTENSIONS.get(self.format)}:
            _atomic_write(target, self.read_bytes())
        else:
            image = self.open()
            if suffix in {"jpg", "jpeg"} and image.mode not in {"RGB", "L"}:
                image = image.convert("RGB")
            target.parent.mkdir(parents=True, exist_ok=True)
            image.save(target)
        return target

    def to_data_uri(self) -> str:
        """Return the image as a ``data:`` URI (base64)."""
        return to_data_uri(self.read_bytes(), self.mime_type)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, ImageRef) and other.sha256 == self.sha256

    def __hash__(self) -> int:
        return hash(self.sha256)

    def __deepcopy__(self, memo: dict[int, Any] | None = None) -> ImageRef:
        # Immutable content: a deep copy may share the reference (and its store).
        return self


class ImageStore(ABC):
    """A content-addressed store of encoded images.

    Subclasses implement ``_write``, ``_read`` and ``_has``; validation, hashing and
    de-duplication live here.

    Args:
        max_image_pixels: Images with more pixels are rejected (decompression-bomb guard).
        max_image_bytes: Encoded images larger than this are rejected.
        png_compress_level: zlib level used when encoding PIL images to PNG (1 is fast).
    """

    def __init__(
        self,
        *,
        max_image_pixels: int = DEFAULT_MAX_IMAGE_PIXELS,
        max_image_bytes: int = DEFAULT_MAX_IMAGE_BYTES,
        png_compress_level: int = 1,
    ) -> None:
        self.max_image_pixels = max_image_pixels
        self.max_image_bytes = max_image_bytes
        self.png_compress_level = png_compress_level

    def put(self, image: PILImage.Image | bytes | ImageRef) -> ImageRef:
        """Validate, hash and store an image; return its bound reference.

        Args:
            image: Encoded bytes (PNG, JPEG, WebP, ...), a PIL image (encoded as PNG, keeping
                its text metadata), or a bound ``ImageRef`` (e.g. an edit that changed nothing
                returning ``ctx.current_image``; stored once, by content).

        Raises:
            InvalidImageError: If the bytes are not a readable image or exceed the limits.
        """
        if isinstance(image, ImageRef):
            data = image.read_bytes()
        elif isinstance(image, (bytes, bytearray, memoryview)):
            data = bytes(image)
        else:
            data = encode_png(image, compress_level=self.png_compress_level)
        ref = inspect_image(
            data, max_image_pixels=self.max_image_pixels, max_image_bytes=self.max_image_bytes
        )
        if not self._has(ref):
            self._write(ref, data)
        return ref.bind(self)

    def read(self, ref: ImageRef) -> bytes:
        """Return the bytes of ``ref``.

        Raises:
            InvalidImageError: If the store does not hold the image.
        """
        try:
            return self._read(ref)
        except (KeyError, FileNotFoundError):
            raise InvalidImageError(
                f"image {ref.filename} is not in {self!r}; was the trajectory folder moved or "
                "pruned?"
            ) from None

    def __contains__(self, ref: object) -> bool:
        return isinstance(ref, ImageRef) and self._has(ref)

    @abstractmethod
    def _write(self, ref: ImageRef, data: bytes) -> None: ...

    @abstractmethod
    def _read(self, ref: ImageRef) -> bytes: ...

    @abstractmethod
    def _has(self, ref: ImageRef) -> bool: ...


class MemoryImageStore(ImageStore):
    """An in-memory store: the default of an agent run. ``Trajectory.save`` writes it out."""

    def __init__(self, **limits: Any) -> None:
        super().__init__(**limits)
        self._data: dict[str, bytes] = {}
        self._lock = threading.Lock()

    def _write(self, ref: ImageRef, data: bytes) -> None:
        with self._lock:
            self._data[ref.sha256] = data

    def _read(self, ref: ImageRef) -> bytes:
        return self._data[ref.sha256]

    def _has(self, ref: ImageRef) -> bool:
        return ref.sha256 in self._data

    def __len__(self) -> int:
        return len(self._data)

    def __getstate__(self) -> dict[str, Any]:
        # Locks cannot be pickled; a pickled trajectory carries its in-memory images with it.
        state = self.__dict__.copy()
        del state["_lock"]
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._lock = threading.Lock()

    def __repr__(self) -> str:
        return f"MemoryImageStore({len(self._data)} images)"


class DirectoryImageStore(ImageStore):
    """A store backed by a folder of ``<sha256>.<ext>`` files, written atomically.

    Args:
        root: The folder (created when missing).
        **limits: ``max_image_pixels``, ``max_image_bytes``, ``png_compress_level``.
    """

    def __init__(self, root: str | os.PathLike[str], **limits: Any) -> None:
        super().__init__(**limits)
        self.root = Path(root)

    def path_of(self, ref: ImageRef) -> Path:
        """Return the file that holds ``ref``."""
        return self.root / ref.filename

    def _write(self, ref: ImageRef, data: bytes) -> None:
        _atomic_write(self.path_of(ref), data)

    def _read(self, ref: ImageRef) -> bytes:
        return self.path_of(ref).read_bytes()

    def _has(self, ref: ImageRef) -> bool:
        path = self.path_of(ref)
        try:
            return path.stat().st_size == ref.nbytes
        except FileNotFoundError:
            return False

    def __repr__(self) -> str:
        return f"DirectoryImageStore({self.root.name!r})"


def inspect_image(
    data: bytes,
    *,
    max_image_pixels: int = DEFAULT_MAX_IMAGE_PIXELS,
    max_image_bytes: int = DEFAULT_MAX_IMAGE_BYTES,
) -> ImageRef:
    """Check that ``data`` is a complete, readable image within limits; return an unbound ref.

    The pixel count is checked from the header before any pixel is decoded, so a decompression
    bomb is rejected cheaply; then the whole image is decoded, so that what is stored can be
    read back.

    Raises:
        InvalidImageError: If the data is empty, too large, not an image, or truncated.
    """
    from PIL import Image, UnidentifiedImageError

    if not data:
        raise InvalidImageError("empty image data")
    if len(data) > max_image_bytes:
        raise InvalidImageError(
            f"encoded image is {len(data):,} bytes, over the limit of {max_image_bytes:,}"
        )
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data)) as image:
                width, height = image.size
                fmt = (image.format or "").lower()
                if width * height > max_image_pixels:
                    raise InvalidImageError(
                        f"image is {width}x{height} = {width * height:,} pixels, over the limit "
                        f"of {max_image_pixels:,} (raise max_image_pixels if this is intended)"
                    )
                # decode every pixel: a stored image is one that can be read back (verify()
                # alone misses a corrupt compressed stream with valid checksums)
                image.load()
    except InvalidImageError:
        raise
    except UnidentifiedImageError:
        raise InvalidImageError(
            f"data is not a readable image (first bytes: {data[:8]!r})"
        ) from None
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as exc:
        raise InvalidImageError(f"image data is corrupt or truncated: {exc}") from None
    if fmt not in _MIME:
        raise InvalidImageError(f"unsupported image format {fmt or 'unknown'!r}")
    if fmt == "png" and b"IEND" not in data[-64:]:
        # PIL decodes a PNG cut after its pixel data without complaint; the end marker says
        # whether the whole file arrived
        raise InvalidImageError("image data is truncated (the PNG has no end chunk)")
    return ImageRef(
        sha256=hashlib.sha256(data).hexdigest(),
        format=cast("ImageFormat", fmt),
        width=width,
        height=height,
        nbytes=len(data),
    )


def encode_png(image: PILImage.Image, *, compress_level: int = 1) -> bytes:
    """Encode a PIL image as PNG, keeping its string metadata as PNG text chunks.

    Args:
        image: The image. CMYK and other modes PNG cannot hold are converted to RGB.
        compress_level: zlib level 0-9 (1 is fast and small enough for generated images).
    """
    from PIL import PngImagePlugin

    if image.mode not in {"1", "L", "LA", "P", "RGB", "RGBA", "I", "I;16"}:
        image = image.convert("RGB")
    info = PngImagePlugin.PngInfo()
    text = getattr(image, "text", None) or {
        k: v for k, v in image.info.items() if isinstance(k, str) and isinstance(v, str)
    }
    for key, value in text.items():
        info.add_text(key, value)
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", pnginfo=info, compress_level=compress_level)
    return buffer.getvalue()


def to_data_uri(data: bytes, mime_type: str = "image/png") -> str:
    """Return ``data`` as a base64 ``data:`` URI."""
    return f"data:{mime_type};base64,{base64.b64encode(data).decode('ascii')}"


def decode_base64_image(text: str) -> bytes:
    """Decode a base64 string or ``data:image/...;base64,`` URI to bytes, strictly.

    Raises:
        InvalidImageError: If the text is not valid base64 (including truncated padding) or the
            data URI is not a base64 image.
    """
    payload = text.strip()
    if payload.startswith("data:"):
        header, sep, payload = payload.partition(",")
        if not sep or not header.endswith(";base64") or not header[5:].startswith("image/"):
            raise InvalidImageError(f"not a base64 image data URI: {header[:40]!r}")
    try:
        return base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise InvalidImageError(f"invalid base64 image data: {exc}") from None


def _atomic_write(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    try:
        tmp.write_bytes(data)
        tmp.replace(path)
    finally:
        tmp.unlink(missing_ok=True)
