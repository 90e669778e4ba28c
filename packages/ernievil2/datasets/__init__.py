"""Build training / test files in the official ERNIE-ViL 2.0 TSV format from the public sets.

The official test file's download link is dead (ERNIE #864), so users rebuild the test (and
training) files from each set's published files. Output, one image-text pair a line, UTF-8::

    caption \\t image_id \\t base64(image bytes) [\\t object tags [\\t label]]

Images are embedded as their original file bytes (no re-encode) unless ``max_side`` is given:
then an image whose long side exceeds it is decoded with cv2, shrunk with INTER_AREA so the
long side equals ``max_side`` and re-encoded as JPEG quality 95 (images that already fit keep
their original bytes). The 4th column (object tags) is only written when a tags table is given;
note that the official ``run_infer.py`` takes the LAST column as the image, so files for it must
have exactly 3 columns.

Published formats read here (one parser each; all return ``ParseResult``):

``folder`` -- any image folder plus a caption file, either
  * TSV ``image_file \\t caption`` or ``image_file \\t image_id \\t caption``, optional header
    line (detected when its first field is a file-column name such as ``image_file`` and its
    last field is ``caption``/``text``); without an id column the id is the file path relative
    to the folder, minus its extension; or
  * a COCO captions JSON (``captions_val2014.json`` layout, cocodataset.org):
    ``{"images": [{"id", "file_name"}], "annotations": [{"image_id", "caption"}]}``; the id is
    ``str(images[].id)`` and lines are grouped by image in ``images`` order.

``coco-cn`` -- COCO-CN (Li et al., TMM 2019; github.com/li-xirong/coco-cn, archive
  ``coco-cn-version1805v1.1``): ``coco-cn_{train,val,test}.txt`` list one image id a line
  (``COCO_val2014_000000123456``); ``imageid.human-written-caption.txt`` (22,218 sentences) and
  ``imageid.manually-translated-caption.txt`` (5,000, test only) hold
  ``COCO_val2014_000000123456#0 \\t sentence`` and ``COCO_val2014_000000123456#zhm#0 sentence``
  (no tab) respectively; the image id ends at the first ``#``. The test split has 1,000 images and 1,053
  human-written sentences (1-2 per image). ``imageid.human-written-tags.txt`` is
  ``image_id tags...`` and can be given as the tags table. Images come from MS-COCO 2014
  (``train2014/``, ``val2014/`` under one root); a COCO 2017 layout (``train2017/``,
  ``val2017/`` with ``000000123456.jpg``) is found too.

``flickr30k-cn`` -- Flickr30k-CN / Flickr8k-CN (Lan, Li, Dong, ACM MM 2017; files from
  lixirong.net/data/mm2017 as read by github.com/weiyuk/fluent-cap): one folder per split
  (``flickr30kzhbbosontrain``, ``flickr30kzhbbosonval``, ``flickr30kzhmbosontest``) holding
  ``ImageSets/<name>.txt`` (one image id a line) and ``TextData/seg.<name>.caption.txt``, lines
  ``1000092795#zhm#0 word word ...`` (id and text split at the first space; ``zhb`` = Baidu
  machine translation, ``zhm`` = human translation; Flickr8k-CN ids keep ``.jpg``:
  ``1000268201_693b08cb0e.jpg#zhb#0``). The text is word-segmented (BosonNLP): tokens may carry
  a ``:pos`` suffix and a run of 2+ spaces marks where punctuation was removed. With
  ``detok`` the suffixes are dropped, tokens joined without spaces (a space is kept between two
  ASCII words) and each removed mark becomes ``，``. Tab-separated lines
  (``1000092795.jpg#zhb#0 \\t caption``) are read too. Images: ``flickr30k-images/<id>.jpg``.
  Sizes: train 29,783 images / 148,915 sentences, val 1,000 / 5,000, test 1,000 / 5,000.

``aic-icc`` -- AI Challenger 2017 image captioning (github.com/AIChallenger/AI_Challenger_2017):
  ``caption_{train,validation}_annotations_2017xxxx.json`` is a JSON list of
  ``{"url", "image_id": "<sha1>.jpg", "caption": [5 sentences]}``; images in
  ``caption_{train,validation}_images_2017xxxx/``. Some sentences contain newlines (deleted,
  as the official baseline does) or are empty (the writer skips and counts them). The id written is the file stem.

``muge`` -- MUGE retrieval / Chinese-CLIP layout (github.com/OFA-Sys/Chinese-CLIP README):
  ``{split}_imgs.tsv`` lines ``image_id \\t base64`` and ``{split}_texts.jsonl`` lines
  ``{"text_id": 8428, "text": "...", "image_ids": [1076345, 517602]}``; one output line per
  (text, image id). The base64 is copied through after validation (URL-safe ``-_`` is mapped to
  ``+/``, which the project's strict reader requires). MUGE test texts carry no image ids.

``labels`` -- labelled images (UniCL's image-label data): a folder of class sub-folders or a
  list ``image_path \t label``; written with the label in column 5 (labels.py).

``flickr8k-cn reference`` -- this project's ``../shared/data/flickr8k_cn``:
  ``captions_{train,val}.tsv`` with the header ``image_file image_id lang caption`` (``lang`` is
  ``zh`` or ``en``; 5 of each per image) and an ``images/`` folder.

Errors: a malformed input line raises ``DataError`` (``FILE:LINE: problem``); other bad input
raises ``ConversionError``; a missing or unreadable image raises ``MissingImageError``
(``FILE: image 'x' not found (caption line N)``) unless ``skip_missing`` is set, in which case
the lines are skipped and counted in ``WriteStats``. The output is written to a temporary name
and renamed only when everything succeeded, so a failed run leaves no partial file.

One module per source (folder, coco_cn, flickr_cn, aic_icc, muge, flickr8k_cn, labels); common.py holds
the records and shared readers, images.py the image checks, writer.py ``write_pairs_tsv``.
"""
from ..data.tsv import DataError
from .aic_icc import parse_aic_icc
from .coco_cn import coco_image_candidates, parse_coco_cn, resolve_coco_image
from .common import (
    Base64Ref,
    ConversionError,
    MissingImageError,
    PairRecord,
    ParseResult,
    clean_field,
    load_tags,
    read_image_list,
    strip_image_ext,
)
from .flickr8k_cn import FLICKR8K_CN_HEADER, parse_flickr8k_cn_reference
from .flickr_cn import detokenize_segmented, find_flickr_cn_files, parse_flickr_cn
from .folder import parse_coco_json, parse_folder, parse_folder_tsv
from .images import shrink_image, sniff_image_format
from .labels import ClassLabels, parse_class_folders, parse_label_list, parse_labels
from .muge import index_base64_tsv, parse_muge
from .writer import WriteStats, write_pairs_tsv

__all__ = [
    "Base64Ref", "ClassLabels", "ConversionError", "DataError", "FLICKR8K_CN_HEADER", "MissingImageError",
    "PairRecord", "ParseResult", "WriteStats", "clean_field", "coco_image_candidates",
    "detokenize_segmented", "find_flickr_cn_files", "index_base64_tsv", "load_tags",
    "parse_aic_icc", "parse_coco_cn", "parse_coco_json", "parse_flickr8k_cn_reference",
    "parse_class_folders", "parse_flickr_cn", "parse_folder", "parse_folder_tsv",
    "parse_label_list", "parse_labels", "parse_muge", "read_image_list",
    "resolve_coco_image", "shrink_image", "sniff_image_format", "strip_image_ext",
    "write_pairs_tsv",
]
