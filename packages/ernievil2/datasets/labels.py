"""``labels``: labelled images (UniCL's image-label data) as a training TSV with a label column.

Input, either
  * a folder of class sub-folders (``DIR/<label>/*.jpg``; the sub-folder name is the label), or
  * a list file, ``image_path \\t label`` a line (image paths relative to ``images_dir``, by
    default the list file's folder; an optional header line such as ``path \\t label``).
A label is a class index or a class name (either language of an imagenet_classes.tsv). With a
class-name file (``classes``: the
imagenet_classes.tsv format, or one name a line; see zeroshot.load_classes) every label is
checked against it and written as its class index, and column 1 holds the class name in
``lang``; without one the label is written as given and column 1 repeats it. Output line::

    class name \\t image_id \\t base64(image bytes) \\t [tags] \\t label

(the image id is the image path relative to its folder, without extension). The trainer's label
rows (``train_files: [[FILE, weight, label]]``) replace column 1 by a prompt of the class at every
step; ``run_infer.sh`` reads the file as an image-text file whose text is the class name.
"""
from __future__ import annotations

import os

from ..data.tsv import DataError
from ..zeroshot import IMAGE_SUFFIXES, LabelResolver, load_classes
from .common import ConversionError, PairRecord, ParseResult, strip_image_ext, text_lines

_PATH_HEADERS = {"path", "image", "image_path", "image_file", "file", "file_name", "filename"}
_LABEL_HEADERS = {"label", "class", "class_index", "class_name", "category"}


class ClassLabels:
    """A class-name file: its names in `lang`, and label -> class index by index or by a name in
    either language of an imagenet_classes.tsv (zeroshot.LabelResolver's matching)."""

    def __init__(self, path: str, lang: str = "zh"):
        self.names = load_classes(path, lang)
        other = load_classes(path, "en" if lang == "zh" else "zh")
        self._resolvers = [LabelResolver(n) for n in ((self.names, other) if other != self.names
                                                       else (self.names,))]

    def __call__(self, label: str, path, line_no: int | None) -> int:
        errors = []
        for resolve in self._resolvers:
            try:
                return resolve(label, path, line_no)
            except DataError as e:
                errors.append(e)
        raise errors[0]


class _Labels:
    """label text -> (label to write, caption), through the class-name file when there is one."""

    def __init__(self, classes: str | None, lang: str):
        if classes and not os.path.isfile(classes):
            raise ConversionError(f"{classes}: class-name file not found")
        self.classes = ClassLabels(classes, lang) if classes else None

    def __call__(self, label: str, path: str, line_no: int | None) -> tuple[str, str]:
        if self.classes is None:
            if not label.strip():
                raise DataError(path, line_no, "empty label")
            return label.strip(), label.strip()
        index = self.classes(label, path, line_no)
        return str(index), self.classes.names[index]


def _record(image_path: str, root: str, label: str, caption: str, source: str, where: str) -> PairRecord:
    image_id = strip_image_ext(os.path.relpath(image_path, root).replace(os.sep, "/"))
    return PairRecord(caption=caption, image_id=image_id, image=image_path, source=source,
                      where=where, label=label)


def parse_class_folders(folder: str, classes: str | None = None, lang: str = "zh") -> ParseResult:
    """One record per image of DIR/<label>/ (sorted by label, then file name)."""
    labels = _Labels(classes, lang)
    records = []
    for sub in sorted(os.listdir(folder)):
        sub_path = os.path.join(folder, sub)
        if not os.path.isdir(sub_path):
            continue
        label, caption = labels(sub, sub_path, None)
        for name in sorted(os.listdir(sub_path)):
            if name.lower().endswith(IMAGE_SUFFIXES):
                records.append(_record(os.path.join(sub_path, name), folder, label, caption,
                                       sub_path, f"class folder {sub!r}"))
    if not records:
        raise ConversionError(f"{folder}: no images in class sub-folders (one sub-folder per "
                              f"class, files ending {', '.join(IMAGE_SUFFIXES)})")
    return ParseResult(records)


def parse_label_list(list_path: str, images_dir: str | None = None, classes: str | None = None,
                     lang: str = "zh") -> ParseResult:
    """One record per ``image_path \\t label`` line of the list file."""
    labels = _Labels(classes, lang)
    root = images_dir if images_dir is not None else os.path.dirname(os.path.abspath(list_path))
    records = []
    for line_no, line in text_lines(list_path):
        if not line.strip():
            continue
        fields = line.split("\t")
        if not records and len(fields) == 2 and fields[0].strip().lower() in _PATH_HEADERS \
                and fields[1].strip().lower() in _LABEL_HEADERS:
            continue  # header
        if len(fields) != 2:
            raise DataError(list_path, line_no, f"expected 2 tab-separated columns "
                            f"(image_path \\t label), found {len(fields)}")
        image = fields[0].strip()
        if not image:
            raise DataError(list_path, line_no, "empty image path (column 1)")
        label, caption = labels(fields[1], list_path, line_no)
        records.append(_record(os.path.join(root, image), root, label, caption, list_path,
                               f"line {line_no}"))
    if not records:
        raise ConversionError(f"{list_path}: no image-label lines")
    return ParseResult(records)


def parse_labels(source: str, images_dir: str | None = None, classes: str | None = None,
                 lang: str = "zh") -> ParseResult:
    """A folder of class sub-folders or a list file (see the module docstring)."""
    if os.path.isdir(source):
        if images_dir is not None:
            raise ConversionError(f"{source}: --images-dir goes with a list file, not a class folder")
        return parse_class_folders(source, classes, lang)
    if not os.path.isfile(source):
        raise ConversionError(f"{source}: no such file or folder")
    return parse_label_list(source, images_dir, classes, lang)
