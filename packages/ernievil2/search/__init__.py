"""Image search: an index folder of embeddings, ids, captions and thumbnails (store), built from a
TSV or an image folder (build), searched through faiss (vectors) with the model it was built
with (searcher).

    from ernievil2.search import Searcher, build_index
    build_index("demo_tiny", "demo_out/test.tsv", "demo_index")
    hits = Searcher.open("demo_index").text_to_image("红色的圆形", k=5)
"""
from .build import add_to_index, build_index
from .searcher import MAX_IMAGE_BYTES, MAX_K, MAX_QUERY_CHARS, Hit, Searcher
from .store import IndexFolderError, QueryError, SearchError, read_manifest

__all__ = ["Hit", "Searcher", "build_index", "add_to_index", "read_manifest", "SearchError",
           "IndexFolderError", "QueryError", "MAX_QUERY_CHARS", "MAX_IMAGE_BYTES", "MAX_K"]
