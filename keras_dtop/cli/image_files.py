"""Image files named on the command line: files and folders, read with clear errors."""

from pathlib import Path

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp")


def collect_images(paths):
    """`[(file, output name without suffix)]` for image files and folders (searched recursively).

    A folder's images are named by their path inside it (`a/b.png` -> `a/b`),
    a file by its stem. Missing paths, folders without images and two inputs
    that would write the same output raise.
    """
    found = []
    for given in map(Path, paths):
        if given.is_dir():
            files = sorted(p for p in given.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
            if not files:
                raise ValueError(f"{given} holds no image files ({', '.join(IMAGE_SUFFIXES)}).")
            found += [(p, p.relative_to(given).with_suffix("").as_posix()) for p in files]
        elif given.is_file():
            found.append((given, given.stem))
        else:
            raise FileNotFoundError(f"No image file or folder at {str(given)!r}.")
    names = {}
    for path, name in found:
        if name in names:
            raise ValueError(f"{names[name]} and {path} would both write {name}.png: predict them separately.")
        names[name] = path
    return found


def read_rgb(path):
    """uint8 RGB `(H, W, 3)`; a file that is no readable image raises a ValueError naming it."""
    from PIL import UnidentifiedImageError

    from keras_dtop.data.folder import read_image

    try:
        return read_image(path)
    except (UnidentifiedImageError, OSError, SyntaxError) as error:
        raise ValueError(f"cannot read {path} as an image: {error}") from None
