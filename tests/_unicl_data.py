"""Small image-text and image-label files for the UniCL tests (and their 2-process worker)."""
from helpers import make_image, tsv_line, write_vocab

CLASSES = ["square", "circle", "triangle"]  # a plain class-name file: the line order is the index
TEMPLATES = ["a {}", "the {} on the left"]


def write_text_file(path, rows):
    """rows: (caption, image_id, image seed); every line with the tags "red circle"."""
    path.write_text("".join(tsv_line(t, i, make_image(s)) + "\tred circle\n" for t, i, s in rows),
                    encoding="utf-8")
    return str(path)


def write_label_file(path, rows):
    """rows: (image_id, image seed, label) -> image-label lines (column 1 the label, no tags)."""
    path.write_text("".join(f"{tsv_line(label, i, make_image(s))}\t\t{label}\n" for i, s, label in rows),
                    encoding="utf-8")
    return str(path)


def write_classes(path):
    path.write_text("\n".join(CLASSES) + "\n", encoding="utf-8")
    return str(path)


def write_templates(path):
    path.write_text("\n".join(TEMPLATES) + "\n", encoding="utf-8")
    return str(path)


def mixed_files(folder):
    """(text file, label file, vocab): 6 captions of 3 images; 8 label rows of 3 classes whose
    image ids reuse the text file's ids and whose class indices equal its image indices."""
    text = write_text_file(folder / "text.tsv", [
        ("红色的圆形", "0", 0), ("a red circle", "0", 0), ("蓝色方块", "1", 1),
        ("two blue squares", "1", 1), ("黄色三角", "2", 2), ("一个绿色的圆", "2", 2)])
    labels = write_label_file(folder / "labels.tsv", [
        ("0", 10, "1"), ("1", 11, "circle"), ("2", 12, "0"), ("5", 13, "square"),
        ("6", 14, "2"), ("7", 15, "triangle"), ("8", 16, "1"), ("9", 17, "0")])
    return text, labels, write_vocab(folder / "vocab.txt")
