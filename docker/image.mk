# The training image (docker/Dockerfile): build, push, convert, test. Included from the Makefile
# (`include docker/image.mk`); PY, VENV and PYTEST_ARGS come from there.
BUILD_IMAGE := scripts/build-image
REGISTRY ?=

.PHONY: image-deps training-image push-image sif image-test

image-deps: ## install podman, runc and debootstrap when no docker engine runs (needs root)
	scripts/image-deps

training-image: image-deps ## build the training image (docker, or podman without a daemon); prints its tag
	$(BUILD_IMAGE) build

push-image: ## tag and push the image: make push-image REGISTRY=registry.example.org/lab
	@if [ -z "$(REGISTRY)" ]; then \
		echo "push-image: set REGISTRY, e.g. make push-image REGISTRY=registry.example.org/lab" >&2; exit 2; fi
	$(BUILD_IMAGE) push "$(REGISTRY)"

sif: ## convert the training image to an Apptainer .sif in dist/ (needs apptainer)
	$(BUILD_IMAGE) sif

image-test: install image-deps ## build the image and train a few steps in it, logging to a real MLflow server
	TASKCODEC_IMAGE_TEST=1 $(PY) -m pytest tests/test_image.py $(PYTEST_ARGS)
