"""The ``ecomaug preview`` command: a labelled grid from a folder of plain images."""

from __future__ import annotations

from click.testing import CliRunner
from PIL import Image

from ecomaug.cli import main


def test_preview_from_an_image_folder(tmp_path):
    for index, colour in enumerate([(200, 30, 30), (30, 200, 30), (30, 30, 200)]):
        image = Image.new("RGB", (50, 40), (245, 245, 245))
        image.paste(colour, (15, 10, 35, 30))
        image.save(tmp_path / f"item{index}.jpg")
    out = tmp_path / "grid.png"
    result = CliRunner().invoke(main, ["preview", "--images", str(tmp_path), "--out", str(out), "-n", "2",
                                       "--size", "32", "--set", "watermark_p=1.0"])
    assert result.exit_code == 0, result.output
    grid = Image.open(out)
    assert grid.width > 3 * 32 and grid.height > 2 * 32  # 2 rows of input | view 1 | view 2


def test_preview_needs_exactly_one_input(tmp_path):
    result = CliRunner().invoke(main, ["preview", "--out", str(tmp_path / "grid.png")])
    assert result.exit_code == 2 and "exactly one of --shards and --images" in result.output
    result = CliRunner().invoke(main, ["preview", "--images", str(tmp_path), "--out", str(tmp_path / "g.png"),
                                       "--set", "no_such_option=1"])
    assert result.exit_code == 2
