"""The API's OpenAPI 3.1 description, served at /docs.json and rendered at /docs (limits from the settings)."""

from __future__ import annotations

from bundle.manifest import ExportedModel
from serving.settings import ServiceSettings

_ERROR = {
    "description": "refused; the message says why",
    "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}},
}


def openapi_spec(model: ExportedModel, settings: ServiceSettings) -> dict:
    height, width = model.input_hw
    classes = model.class_names
    k = {"type": "integer", "minimum": 1, "maximum": len(classes), "default": min(3, len(classes))}
    answers = {
        "description": "top-k labels per image, most probable first",
        "content": {
            "application/json": {"schema": {"type": "array", "items": {"$ref": "#/components/schemas/Answer"}}}
        },
    }
    errors = {str(code): _ERROR for code in (400, 408, 413, 415, 429, 503)}
    return {
        "openapi": "3.1.0",
        "info": {
            "title": f"CIFAR-10 classifier: {model.name}",
            "version": "1",
            "description": f"Classifies images into {len(classes)} classes ({', '.join(classes)}) with the exported "
            f"model {model.name!r} ({model.manifest.get('architecture')}). Any image is brought to {width}x{height} "
            "as the model's manifest says (EXIF orientation, alpha on white, centre crop, bicubic resize). "
            f"Limits: {settings.max_images} images and {settings.max_body_mb:g} MiB per request.",
        },
        "paths": {
            "/classify": {
                "post": {
                    "summary": "Classify image files (PNG, JPEG, BMP, GIF, WebP, TIFF)",
                    "description": "Either a multipart form with one or more files in the field `images` (and "
                    "optionally `k`), or one image as the raw body with `Content-Type: image/*` and `?k=` in the "
                    "query (e.g. `curl --data-binary @cat.jpg -H 'Content-Type: image/jpeg' .../classify`).",
                    "parameters": [{"name": "k", "in": "query", "schema": k, "description": "raw-body requests"}],
                    "requestBody": {
                        "required": True,
                        "content": {
                            "multipart/form-data": {
                                "schema": {
                                    "type": "object",
                                    "required": ["images"],
                                    "properties": {
                                        "images": {"type": "array", "items": {"type": "string", "format": "binary"}},
                                        "k": k,
                                    },
                                }
                            },
                            "image/*": {"schema": {"type": "string", "format": "binary"}},
                        },
                    },
                    "responses": {"200": answers, **errors},
                }
            },
            "/classify_pixels": {
                "post": {
                    "summary": f"Classify uint8 RGB pixel arrays of shape (N, {height}, {width}, 3)",
                    "requestBody": {
                        "required": True,
                        "content": {
                            "application/json": {
                                "schema": {
                                    "type": "object",
                                    "required": ["pixels"],
                                    "properties": {"pixels": {"type": "array"}, "k": k},
                                }
                            }
                        },
                    },
                    "responses": {"200": answers, **errors},
                }
            },
            "/model": {
                "get": {
                    "summary": "The model's manifest: classes, accuracy, input contract, checksums",
                    "responses": {"200": {"description": "the manifest"}},
                }
            },
        },
        "components": {
            "schemas": {
                "Answer": {
                    "type": "object",
                    "properties": {
                        "model": {"type": "string"},
                        "file": {"type": "string", "description": "the uploaded file's name (/classify only)"},
                        "predictions": {
                            "type": "array",
                            "items": {
                                "type": "object",
                                "properties": {
                                    "label": {"type": "string", "enum": classes},
                                    "probability": {"type": "number"},
                                },
                            },
                        },
                    },
                },
                "Error": {
                    "type": "object",
                    "properties": {"error": {"type": "string"}, "status": {"type": "integer"}},
                },
            }
        },
    }
