"""A possible decompression bomb is refused as ``too_many_pixels`` without printing a warning."""

from __future__ import annotations

import warnings
from pathlib import Path

import pytest
from PIL import Image

from tests.plugins.media_factory import make_png_bomb
from xicon_dance.errors import InputError
from xicon_dance.media import check_image


def test_bomb_is_refused_and_no_warning_escapes(tmp_path: Path) -> None:
    bomb = make_png_bomb(tmp_path / "bomb.png", 12000, 12000)
    # between Pillow's warning threshold and its error threshold: Pillow only warns here
    assert Image.MAX_IMAGE_PIXELS < 12000 * 12000 < 2 * Image.MAX_IMAGE_PIXELS
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with pytest.raises(InputError) as err:
            check_image(bomb, "image_base64")
    assert err.value.code == "too_many_pixels" and err.value.field == "image_base64"
    assert [w for w in caught if issubclass(w.category, Image.DecompressionBombWarning)] == []
    # the limit is Pillow's own and the warning filter of the process is left as it was
    assert not any(
        f[2] is Image.DecompressionBombWarning and f[0] == "error" for f in warnings.filters
    )
