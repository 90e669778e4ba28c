# Flickr8k-CN on real photos (included by the Makefile). Needs the reference data in ../shared
# (override: make flickr8k SHARED=/path/to/shared); everything is written to flickr8k_out/.
#   make flickr8k           TSVs, object tags, Lite0 tower, train (~5 min on 2 cores), then
#                           val recall in the official and the multi-caption protocols
#   make flickr8k-baseline  frozen Lite0 features + character n-gram bag, linear maps (~2 min)
#   make flickr8k-ablation  views / targets / caption languages, 3 seeds a row (~25 min on 2 cores)
#   make flickr8k-unicl     + the Lite0 classifier's confident top-1 classes as image-label rows
#                           (UniCL), 3 seeds a row, and zero-shot top-1/5 on the labelled Lite0 photos
#   make flickr8k-vicha     ViCHA rows (hierarchical alignment, visual concepts) with a 2-layer
#                           text tower, 100 steps, 3 seeds a row (~45 min on 2 cores)
SHARED      ?= ../shared
F8K_OUT     ?= flickr8k_out
F8K_CONFIG  ?= packages/configs/flickr8k_cn_lite0.yaml
F8K_DATA    := $(SHARED)/data/flickr8k_cn
F8K_LITE0   := $(SHARED)/data/efficientnet_lite0/efficientnet_lite0_imagenet.npz
F8K_CLASSES := $(SHARED)/data/imagenet_classes.tsv
F8K_TRAIN   := $(F8K_OUT)/flickr8k_cn_train_zh.tsv
F8K_VAL     := $(F8K_OUT)/flickr8k_cn_val_zh.tsv
# the recipe trains on both languages' captions (10 per photo); val stays Chinese
F8K_BOTH    := $(F8K_OUT)/flickr8k_cn_train_both.tsv
F8K_TAGGED  := $(F8K_OUT)/flickr8k_cn_train_both_tags.tsv
F8K_TAGGED_ZH := $(F8K_OUT)/flickr8k_cn_train_zh_tags.tsv
F8K_VOCAB   := $(F8K_OUT)/vocab.txt
F8K_TOWER   := $(F8K_OUT)/lite0_visual.pdparams
F8K_TSVS    := $(F8K_OUT)/.tsvs-zh-both.stamp
# the recipe's file keys, pointed at F8K_OUT (the yaml's defaults assume flickr8k_out/)
F8K_PATHS    = train_file=$(F8K_TAGGED) val_file=$(F8K_VAL) vocab_file=$(F8K_VOCAB) \
               init_image_tower=$(F8K_TOWER) image_feature_cache_dir=$(F8K_OUT)/feature_cache

# UniCL image-label rows: training photos whose Lite0 top-1 probability is >= 0.5, by class index
F8K_LABELS  := $(F8K_OUT)/flickr8k_cn_train_lite0_labels.tsv
F8K_ZS_TSV  := $(F8K_OUT)/imagenet50_labels.tsv
F8K_LABEL_ROWS = train_files=[[$(F8K_LABELS), 0.1, label]]

.PHONY: flickr8k flickr8k-data flickr8k-baseline flickr8k-ablation flickr8k-unicl flickr8k-vicha \
        clean-flickr8k

$(F8K_TSVS): | setup
	@test -f $(F8K_DATA)/captions_train.tsv || { echo "Flickr8k-CN reference data not found in $(F8K_DATA) (set SHARED=...)" >&2; exit 1; }
	$(PY) tools/build_tsv.py flickr8k-cn $(F8K_DATA) $(F8K_OUT) --lang zh --no-progress
	$(PY) tools/build_tsv.py flickr8k-cn $(F8K_DATA) $(F8K_OUT) --lang both --splits train --no-progress
	touch $@

$(F8K_TAGGED): $(F8K_TSVS)
	$(PY) tools/extract_tags.py $(F8K_BOTH) $@ --lang zh --topk 3 --weights $(F8K_LITE0) --classes $(F8K_CLASSES)

# the Chinese-only training file, for the ablation's recipe-zh row
$(F8K_TAGGED_ZH): $(F8K_TSVS)
	$(PY) tools/extract_tags.py $(F8K_TRAIN) $@ --lang zh --topk 3 --weights $(F8K_LITE0) --classes $(F8K_CLASSES)

# a vocab of the training captions and tags (val characters never seen become [UNK])
$(F8K_VOCAB): $(F8K_TAGGED)
	$(PY) tools/build_vocab.py $< --out $@

$(F8K_TOWER): | setup
	$(PY) tools/convert_lite0_weights.py $(F8K_LITE0) $@

flickr8k-data: $(F8K_TAGGED) $(F8K_VOCAB) $(F8K_TOWER)

flickr8k: flickr8k-data
	rm -rf $(F8K_OUT)/train
	PYTHON=$(PY) bash run_train.sh 0 $(F8K_CONFIG) $(F8K_PATHS) output_dir=$(F8K_OUT)/train log_dir=$(F8K_OUT)/train
	PYTHON=$(PY) bash run_infer.sh 0 $(F8K_OUT)/train/final/infer.yaml test_file=$(F8K_VAL) \
	    output_file=$(F8K_OUT)/val_embeddings.out log_dir=$(F8K_OUT)/train
	@echo "== Flickr8k-CN val, official protocol (line i <-> line i)"
	@$(PY) eval_retri.py $(F8K_OUT)/val_embeddings.out
	@echo "== Flickr8k-CN val, multi-caption protocol (113 images x 5 captions)"
	@$(PY) eval_retri.py $(F8K_OUT)/val_embeddings.out --protocol multi-caption --tsv $(F8K_VAL)

flickr8k-baseline: $(F8K_TSVS)
	$(PY) tools/baseline_frozen.py $(F8K_TRAIN) $(F8K_VAL) --weights $(F8K_LITE0) \
	    --cache $(F8K_OUT)/cache --out $(F8K_OUT)/baseline.json

flickr8k-ablation: flickr8k-data $(F8K_TAGGED_ZH)
	$(PY) benchmarks/ablation.py --out-dir $(F8K_OUT)/ablation --config $(F8K_CONFIG) --jobs 2 \
	    --rows it,it+ii,it+tt,it+tags,it-unicl,recipe,recipe-zh \
	    --row-set recipe-zh:train_file=$(F8K_TAGGED_ZH) $(F8K_PATHS) image_feature_cache_seed=0

$(F8K_LABELS): $(F8K_TSVS)
	tail -n +2 $(F8K_DATA)/captions_train.tsv | cut -f1 | sort -u > $(F8K_OUT)/train_images.txt
	$(PY) tools/confident_labels.py $(F8K_DATA)/images $(F8K_OUT)/lite0_top1_p50.txt --min-prob 0.5 \
	    --only $(F8K_OUT)/train_images.txt --weights $(F8K_LITE0) --classes $(F8K_CLASSES)
	$(PY) tools/build_tsv.py labels $(F8K_OUT)/lite0_top1_p50.txt $@ --images-dir $(F8K_DATA)/images \
	    --classes $(F8K_CLASSES) --lang zh --no-progress

# the 50 labelled ImageNet photos of the Lite0 reference, as a zero-shot test TSV
$(F8K_ZS_TSV): | setup
	cut -f1,2 $(SHARED)/data/efficientnet_lite0/imagenet50/labels.tsv > $(F8K_OUT)/imagenet50_list.tsv
	$(PY) tools/build_tsv.py labels $(F8K_OUT)/imagenet50_list.tsv $@ \
	    --images-dir $(SHARED)/data/efficientnet_lite0/imagenet50 --classes $(F8K_CLASSES) --no-progress

flickr8k-unicl: flickr8k-data $(F8K_LABELS) $(F8K_ZS_TSV)
	$(PY) benchmarks/ablation.py --out-dir $(F8K_OUT)/ablation_unicl --config $(F8K_CONFIG) --jobs 2 \
	    --rows recipe+labels,notags+labels,recipe --row-set "recipe+labels:$(F8K_LABEL_ROWS)" \
	    --row-set "notags+labels:$(F8K_LABEL_ROWS)" $(F8K_PATHS) image_feature_cache_seed=0 \
	    label_classes=$(F8K_CLASSES) label_lang=zh
	for run in $(F8K_OUT)/ablation_unicl/runs/*; do for lang in zh en; do \
	    $(PY) eval_zeroshot.py $$run/final/infer.yaml --classes $(F8K_CLASSES) --images $(F8K_ZS_TSV) \
	        --lang $$lang --json $$run/zeroshot_$$lang.json > /dev/null || exit 1; done; done
	$(PY) benchmarks/unicl_zeroshot.py $(F8K_OUT)/ablation_unicl

# the recipe with a 2-layer text tower (K >= 2 needs layers to align), + hierarchical_layers=2,
# + visual_concepts=embed (val tags: the classifier that made the training tags, on each image)
flickr8k-vicha: flickr8k-data
	$(PY) benchmarks/ablation.py --out-dir $(F8K_OUT)/ablation_vicha --config $(F8K_CONFIG) \
	    --rows recipe,recipe-k2,recipe-concepts --steps 100 $(F8K_PATHS) image_feature_cache_seed=0 \
	    text_model_config=ernie-mean-2l tag_classifier=$(F8K_LITE0) tag_classes=$(F8K_CLASSES) tag_lang=zh

clean-flickr8k:
	rm -rf $(F8K_OUT)
