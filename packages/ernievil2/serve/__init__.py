"""ernievil2-serve: a local web page and JSON API over a search index (ernievil2.search):
text-to-image, image-to-image and caption search, and zero-shot classification of an upload.
A command package: the library never imports it."""
