"""Draw the two story images the playground feeds in (`examples/story_1.jpg`, `examples/story_2.jpg`).

Procedural and deterministic, so the repository carries no third-party pictures:
a day at the beach (sun, sea, a red umbrella), then the same beach at sunset with a sandcastle.
"""
from pathlib import Path

from PIL import Image, ImageDraw

OUT = Path(__file__).resolve().parents[1] / "examples"


def beach(sky: tuple, sun: tuple, sun_y: int, castle: bool) -> Image.Image:
    """A 256 x 256 beach scene."""
    image = Image.new("RGB", (256, 256), sky)
    draw = ImageDraw.Draw(image)
    draw.ellipse((170, sun_y, 220, sun_y + 50), fill=sun)
    draw.rectangle((0, 140, 256, 190), fill=(30, 90, 170))                    # sea
    draw.rectangle((0, 190, 256, 256), fill=(230, 200, 140))                  # sand
    for x in range(0, 256, 32):                                                # waves
        draw.arc((x, 180, x + 32, 200), 180, 360, fill=(240, 240, 255), width=2)
    if castle:
        draw.rectangle((60, 200, 120, 235), fill=(200, 160, 90))
        for x in (60, 80, 100):
            draw.rectangle((x, 190, x + 12, 200), fill=(200, 160, 90))
    else:
        draw.line((90, 235, 90, 160), fill=(80, 60, 40), width=3)             # umbrella pole
        draw.pieslice((50, 140, 130, 190), 180, 360, fill=(210, 40, 40))
    return image


def main() -> None:
    OUT.mkdir(exist_ok=True)
    beach((135, 200, 250), (255, 230, 60), 30, castle=False).save(OUT / "story_1.jpg", quality=90)
    beach((250, 150, 90), (255, 120, 40), 100, castle=True).save(OUT / "story_2.jpg", quality=90)
    print(f"wrote {OUT / 'story_1.jpg'} and {OUT / 'story_2.jpg'}")


if __name__ == "__main__":
    main()
