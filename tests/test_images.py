"""Images: content-addressed stores, validation limits, encoding helpers and ImageRef."""

from __future__ import annotations

import base64
import copy
import hashlib
import io
import pickle
import struct
import zlib
from pathlib import Path

import pytest
from PIL import Image, PngImagePlugin

from genagent.errors import InvalidImageError
from genagent.images import (
    DirectoryImageStore,
    ImageRef,
    MemoryImageStore,
    decode_base64_image,
    encode_png,
    to_data_uri,
)


def png_bytes(size: tuple[int, int] = (16, 12), colour: str = "red", mode: str = "RGB") -> bytes:
    buffer = io.BytesIO()
    Image.new(mode, size, colour).save(buffer, format="PNG")
    return buffer.getvalue()


def jpeg_bytes(size: tuple[int, int] = (16, 12)) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, "blue").save(buffer, format="JPEG")
    return buffer.getvalue()


def png_claiming_size(width: int, height: int) -> bytes:
    """A tiny, well-formed PNG whose header claims ``width`` x ``height`` pixels."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return (
            struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
        )

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + chunk(b"IDAT", zlib.compress(b"\x00" * 64))
        + chunk(b"IEND", b"")
    )


@pytest.fixture(params=["memory", "directory"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> MemoryImageStore | DirectoryImageStore:
    if request.param == "memory":
        return MemoryImageStore()
    return DirectoryImageStore(tmp_path / "images")


# --------------------------------------------------------------------------- stores


def test_put_bytes_returns_a_ref_describing_them(
    store: MemoryImageStore | DirectoryImageStore,
) -> None:
    data = png_bytes((16, 12))

    ref = store.put(data)

    assert ref.sha256 == hashlib.sha256(data).hexdigest()
    assert (ref.format, ref.width, ref.height, ref.nbytes) == ("png", 16, 12, len(data))
    assert ref.filename == f"{ref.sha256}.png"
    assert ref.mime_type == "image/png"


def test_put_bytes_stores_them_unchanged(store: MemoryImageStore | DirectoryImageStore) -> None:
    data = jpeg_bytes()

    ref = store.put(data)

    assert ref.format == "jpeg"
    assert ref.read_bytes() == data
    assert store.read(ref) == data


def test_put_accepts_bytes_like_objects(store: MemoryImageStore | DirectoryImageStore) -> None:
    data = png_bytes()

    assert store.put(bytearray(data)) == store.put(memoryview(data)) == store.put(data)


def test_put_pil_image_stores_a_png_with_its_pixels(
    store: MemoryImageStore | DirectoryImageStore,
) -> None:
    image = Image.new("RGB", (10, 7), (1, 2, 3))

    ref = store.put(image)

    assert (ref.format, ref.width, ref.height) == ("png", 10, 7)
    decoded = ref.open()
    assert decoded.size == (10, 7)
    assert decoded.getpixel((5, 3)) == (1, 2, 3)


def test_same_content_is_stored_once_with_equal_refs(
    store: MemoryImageStore | DirectoryImageStore,
) -> None:
    first = store.put(png_bytes(colour="green"))
    second = store.put(png_bytes(colour="green"))

    assert first == second
    assert first in store
    if isinstance(store, MemoryImageStore):
        assert len(store) == 1
    else:
        assert [p.name for p in store.root.iterdir()] == [first.filename]


def test_different_images_get_different_refs(
    store: MemoryImageStore | DirectoryImageStore,
) -> None:
    red = store.put(png_bytes(colour="red"))
    blue = store.put(png_bytes(colour="blue"))

    assert red != blue
    assert red.read_bytes() != blue.read_bytes()


def test_directory_store_writes_content_addressed_files(tmp_path: Path) -> None:
    store = DirectoryImageStore(tmp_path / "new" / "images")
    data = png_bytes()

    ref = store.put(data)

    assert store.path_of(ref) == tmp_path / "new" / "images" / ref.filename
    assert store.path_of(ref).read_bytes() == data
    assert [p.name for p in store.root.iterdir()] == [ref.filename]  # no temp files left


def test_directory_store_reads_images_written_by_another_instance(tmp_path: Path) -> None:
    ref = DirectoryImageStore(tmp_path).put(png_bytes())
    other = DirectoryImageStore(tmp_path)

    assert ref in other
    assert other.read(ref) == ref.read_bytes()


def test_directory_store_rewrites_a_file_of_the_wrong_size(tmp_path: Path) -> None:
    store = DirectoryImageStore(tmp_path)
    data = png_bytes()
    ref = store.put(data)
    store.path_of(ref).write_bytes(data[:10])

    store.put(data)

    assert store.path_of(ref).read_bytes() == data


def test_reading_an_image_the_store_lacks_raises_invalid_image_error(
    store: MemoryImageStore | DirectoryImageStore,
) -> None:
    foreign = MemoryImageStore().put(png_bytes())

    assert foreign not in store
    with pytest.raises(InvalidImageError, match=foreign.filename):
        store.read(foreign)


# --------------------------------------------------------------------------- validation


@pytest.mark.parametrize(
    "data",
    [b"not an image at all", b"GIF89a", b"\x89PNG\r\n\x1a\n"],
    ids=["text", "gif_magic_only", "png_signature_only"],
)
def test_invalid_bytes_are_rejected(
    store: MemoryImageStore | DirectoryImageStore, data: bytes
) -> None:
    with pytest.raises(InvalidImageError):
        store.put(data)


def test_empty_bytes_are_rejected(store: MemoryImageStore | DirectoryImageStore) -> None:
    with pytest.raises(InvalidImageError, match="empty"):
        store.put(b"")


def test_truncated_png_is_rejected(store: MemoryImageStore | DirectoryImageStore) -> None:
    data = encode_png(Image.effect_noise((64, 64), 50), compress_level=0)

    with pytest.raises(InvalidImageError, match="corrupt or truncated"):
        store.put(data[: len(data) // 2])


def test_a_png_cut_after_its_pixels_is_rejected(
    store: MemoryImageStore | DirectoryImageStore,
) -> None:
    data = encode_png(Image.new("RGB", (16, 16), "red"))
    with pytest.raises(InvalidImageError, match="no end chunk"):
        store.put(data[:-12])  # the IEND chunk is gone; the pixels are all there


def test_png_with_a_corrupt_chunk_is_rejected(
    store: MemoryImageStore | DirectoryImageStore,
) -> None:
    data = bytearray(png_bytes())
    data[-17] ^= 0xFF  # inside the IDAT data, just before its CRC and IEND

    with pytest.raises(InvalidImageError):
        store.put(bytes(data))


def test_rejected_images_are_not_stored() -> None:
    store = MemoryImageStore(max_image_pixels=10)

    with pytest.raises(InvalidImageError):
        store.put(png_bytes((4, 4)))

    assert len(store) == 0


def test_image_over_the_pixel_limit_is_rejected() -> None:
    store = MemoryImageStore(max_image_pixels=100)

    with pytest.raises(InvalidImageError, match=r"11x10 = 110 pixels.*limit of 100"):
        store.put(png_bytes((11, 10)))


def test_pixel_limit_is_checked_from_the_header_before_decoding() -> None:
    # The header claims 4 MP but the file holds almost no pixel data: decoding it would fail
    # as truncated, so the pixel-limit message proves the header alone was enough.
    store = MemoryImageStore(max_image_pixels=1_000_000)

    with pytest.raises(InvalidImageError, match=r"2000x2000 = 4,000,000 pixels"):
        store.put(png_claiming_size(2000, 2000))


def test_decompression_bomb_is_rejected_with_default_limits() -> None:
    with pytest.raises(InvalidImageError):
        MemoryImageStore().put(png_claiming_size(60_000, 60_000))


def test_image_at_the_pixel_limit_is_accepted() -> None:
    store = MemoryImageStore(max_image_pixels=110)

    assert store.put(png_bytes((11, 10))).width == 11


def test_image_over_the_byte_limit_is_rejected() -> None:
    data = png_bytes()
    store = MemoryImageStore(max_image_bytes=len(data) - 1)

    with pytest.raises(InvalidImageError, match=f"{len(data):,} bytes"):
        store.put(data)


def test_unsupported_format_is_rejected() -> None:
    buffer = io.BytesIO()
    Image.new("RGB", (4, 4)).save(buffer, format="TIFF")

    with pytest.raises(InvalidImageError, match="unsupported image format 'tiff'"):
        MemoryImageStore().put(buffer.getvalue())


# --------------------------------------------------------------------------- encoding


def test_encode_png_keeps_text_metadata() -> None:
    info = PngImagePlugin.PngInfo()
    info.add_text("genagent.scene", '{"objects": []}')
    buffer = io.BytesIO()
    Image.new("RGB", (8, 8)).save(buffer, format="PNG", pnginfo=info)
    opened = Image.open(io.BytesIO(buffer.getvalue()))

    decoded = Image.open(io.BytesIO(encode_png(opened)))

    assert decoded.info["genagent.scene"] == '{"objects": []}'


def test_encode_png_keeps_string_info_of_a_new_image() -> None:
    image = Image.new("RGB", (8, 8))
    image.info["caption"] = "a red apple"

    decoded = Image.open(io.BytesIO(encode_png(image)))

    assert decoded.info["caption"] == "a red apple"


def test_stored_pil_image_keeps_text_metadata() -> None:
    image = Image.new("RGB", (8, 8))
    image.info["seed"] = "42"

    assert MemoryImageStore().put(image).open().info["seed"] == "42"


def test_encode_png_converts_modes_png_cannot_hold() -> None:
    decoded = Image.open(io.BytesIO(encode_png(Image.new("CMYK", (4, 4), (0, 255, 255, 0)))))

    assert decoded.format == "PNG"
    assert decoded.mode == "RGB"
    assert decoded.getpixel((0, 0)) == (255, 0, 0)


def test_encode_png_is_deterministic() -> None:
    image = Image.effect_noise((32, 32), 20)

    assert encode_png(image) == encode_png(image)


# --------------------------------------------------------------------------- base64


def test_decode_base64_image_accepts_plain_base64() -> None:
    data = png_bytes()

    assert decode_base64_image(base64.b64encode(data).decode()) == data


def test_decode_base64_image_accepts_data_uris() -> None:
    data = png_bytes()

    assert decode_base64_image(f"data:image/png;base64,{base64.b64encode(data).decode()}") == data


def test_decode_base64_image_round_trips_to_data_uri() -> None:
    data = jpeg_bytes()

    assert decode_base64_image(to_data_uri(data, "image/jpeg")) == data


def test_decode_base64_image_ignores_surrounding_whitespace() -> None:
    data = png_bytes()

    assert decode_base64_image(f"\n  {base64.b64encode(data).decode()}  \n") == data


@pytest.mark.parametrize(
    "text",
    ["not base64!!", "iVBORw0KGgo", "iVBORw0KGgoAAA=A"],
    ids=["invalid_characters", "truncated_padding", "padding_in_the_middle"],
)
def test_decode_base64_image_rejects_invalid_base64(text: str) -> None:
    with pytest.raises(InvalidImageError, match="invalid base64"):
        decode_base64_image(text)


@pytest.mark.parametrize(
    "uri",
    ["data:text/plain;base64,aGVsbG8=", "data:image/png,rawbytes", "data:image/png;base64"],
    ids=["not_an_image", "not_base64", "no_comma"],
)
def test_decode_base64_image_rejects_non_image_data_uris(uri: str) -> None:
    with pytest.raises(InvalidImageError, match="data URI"):
        decode_base64_image(uri)


def test_image_ref_to_data_uri_embeds_its_bytes() -> None:
    ref = MemoryImageStore().put(png_bytes())

    uri = ref.to_data_uri()

    assert uri.startswith("data:image/png;base64,")
    assert decode_base64_image(uri) == ref.read_bytes()


# --------------------------------------------------------------------------- ImageRef


def test_unbound_ref_read_raises_a_helpful_error() -> None:
    ref = ImageRef.model_validate(MemoryImageStore().put(png_bytes()).model_dump())

    assert ref.store is None
    with pytest.raises(InvalidImageError, match=r"not bound to an image store.*Trajectory\.load"):
        ref.read_bytes()


def test_binding_a_ref_makes_it_readable(tmp_path: Path) -> None:
    store = DirectoryImageStore(tmp_path)
    original = store.put(png_bytes())
    ref = ImageRef.model_validate(original.model_dump())

    assert ref.bind(store) is ref
    assert ref.read_bytes() == original.read_bytes()


def test_ref_with_an_invalid_hash_is_rejected() -> None:
    with pytest.raises(ValueError, match="sha256"):
        ImageRef(sha256="../../etc/passwd", format="png", width=1, height=1, nbytes=1)


def test_save_with_the_stored_format_writes_identical_bytes(tmp_path: Path) -> None:
    ref = MemoryImageStore().put(png_bytes())

    path = ref.save(tmp_path / "x.png")

    assert path == tmp_path / "x.png"
    assert path.read_bytes() == ref.read_bytes()


def test_save_without_suffix_uses_the_stored_format(tmp_path: Path) -> None:
    ref = MemoryImageStore().put(jpeg_bytes())

    path = ref.save(tmp_path / "x")

    assert path == tmp_path / "x.jpg"
    assert path.read_bytes() == ref.read_bytes()


def test_save_with_another_suffix_converts(tmp_path: Path) -> None:
    ref = MemoryImageStore().put(png_bytes((20, 10), mode="RGBA", colour="red"))

    path = ref.save(tmp_path / "x.jpg")

    with Image.open(path) as image:
        assert image.format == "JPEG"
        assert image.size == (20, 10)


def test_save_creates_missing_folders(tmp_path: Path) -> None:
    ref = MemoryImageStore().put(png_bytes())

    assert ref.save(tmp_path / "a" / "x.png").exists()
    assert ref.save(tmp_path / "b" / "x.webp").exists()


def test_refs_are_equal_and_hash_equal_by_content(tmp_path: Path) -> None:
    data = png_bytes()
    in_memory = MemoryImageStore().put(data)
    on_disk = DirectoryImageStore(tmp_path).put(data)
    other = MemoryImageStore().put(png_bytes(colour="blue"))

    assert in_memory == on_disk
    assert hash(in_memory) == hash(on_disk)
    assert len({in_memory, on_disk, other}) == 2
    assert in_memory != other
    assert in_memory != in_memory.sha256


def test_deepcopy_keeps_the_binding() -> None:
    ref = MemoryImageStore().put(png_bytes())

    copied = copy.deepcopy({"image": ref})["image"]

    assert copied == ref
    assert copied.read_bytes() == ref.read_bytes()


def test_pickled_ref_bound_to_a_memory_store_stays_readable() -> None:
    ref = MemoryImageStore().put(png_bytes())

    restored = pickle.loads(pickle.dumps(ref))

    assert restored == ref
    assert restored.read_bytes() == ref.read_bytes()


def test_unpickled_memory_store_accepts_new_images() -> None:
    store = MemoryImageStore()
    store.put(png_bytes())

    restored = pickle.loads(pickle.dumps(store))
    restored.put(png_bytes(colour="blue"))

    assert len(restored) == 2


def test_png_with_valid_checksums_but_corrupt_pixels_is_rejected() -> None:
    # a corrupt compressed stream whose chunk CRCs were recomputed passes PIL's verify();
    # the store decodes the pixels, so the image is rejected before it is stored
    image = Image.new("RGB", (32, 32), "red")
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    data = bytearray(buffer.getvalue())
    start = data.index(b"IDAT") - 4
    length = struct.unpack(">I", data[start : start + 4])[0]
    body = bytearray(data[start + 8 : start + 8 + length])
    body[2:] = b"\xff" * (len(body) - 2)  # keep the zlib header, ruin the deflate stream
    crc = struct.pack(">I", zlib.crc32(b"IDAT" + bytes(body)) & 0xFFFFFFFF)
    data[start + 8 : start + 12 + length] = bytes(body) + crc
    with pytest.raises(InvalidImageError, match="corrupt or truncated"):
        MemoryImageStore().put(bytes(data))
