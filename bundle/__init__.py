"""The exported-model bundle: one home for the format that the trainer writes and serving reads.

A bundle is a folder holding model files (ONNX, TorchScript, ...) and
`manifest.json`, which names the classes, the input contract and every file's
checksum. Nothing here imports torch: the offline predictor and the service
read bundles with numpy, Pillow and ONNX Runtime alone.

- `bundle.contract`: the input contract (size, layout, pixel scaling, preprocessing rules).
- `bundle.manifest`: reading, validating and writing `manifest.json`; checksums.
- `bundle.preprocess`: image bytes or pixels -> the model's input; softmax and top-k.
- `bundle.runtime`: run a bundle's model (ONNX Runtime, or TorchScript when torch is installed).
- `bundle.class_tree`: the class-folder data layout (`[split/]<class>/<image>`, folder or tar).
- `bundle.environment`: the machine and library versions recorded beside results.
"""
