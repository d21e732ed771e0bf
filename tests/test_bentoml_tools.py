"""The service as BentoML's own tools see it, on real `bentoml serve` processes: typed APIs in /schema.json and
/docs.json, the Python clients (answers equal curl's), the API methods called in Python (equal HTTP's), `k` by
one rule on every route, the model store, a Bento that carries its model and serves from another folder and
another BENTOML_HOME, a serving path without torch, and `make serve`'s defaults. Run:
`pytest tests/test_bentoml_tools.py`.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import bentoml
import httpx
import numpy as np
import pytest
from helpers import REPO, ServedClassifier, read_test_images, run_module
from PIL import Image

from bundle.manifest import load_model_dir
from serving import Classifier
from serving.model_store import STORE_NAME, TORCH_FREE_ARTIFACTS
from serving.testing import ServedProcess, free_port

pytestmark = pytest.mark.slow
TIMEOUT = 30


@pytest.fixture(scope="module")
def served(default_model: Path, tmp_path_factory: pytest.TempPathFactory):
    """`bentoml serve` with the default settings (the bundled model), its own BENTOML_HOME."""
    folder = tmp_path_factory.mktemp("tools")
    with ServedClassifier(home=folder / "home", log_path=folder / "server.log") as server:
        server.wait_ready()
        yield server


@pytest.fixture(scope="module")
def images(shared_archive: Path, tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    """One test JPEG per class, as files."""
    folder = tmp_path_factory.mktemp("images")
    paths = []
    for name, label, data in read_test_images(shared_archive, per_class=1):
        path = folder / f"{label}-{Path(name).name}"
        path.write_bytes(data)
        paths.append(path)
    return paths


def _curl(url: str, *args: str) -> object:
    result = subprocess.run(["curl", "-sS", *args, url], capture_output=True, text=True, timeout=TIMEOUT, check=True)
    return json.loads(result.stdout)


def _python(code: str, *args: str, home: Path) -> str:
    """The last line `python -c code args` prints, in a BENTOML_HOME of its own."""
    env = {**os.environ, "BENTOML_HOME": str(home), "BENTOML_DO_NOT_TRACK": "1"}
    result = subprocess.run(
        [sys.executable, "-c", code, *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout.strip().splitlines()[-1]


def _bentoml(home: Path, *args: str, cwd: Path = REPO) -> subprocess.CompletedProcess:
    env = {**os.environ, "BENTOML_HOME": str(home), "BENTOML_DO_NOT_TRACK": "1"}
    result = subprocess.run(
        [sys.executable, "-m", "bentoml", *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    return result


# ------------------------------------------------------------------ typed APIs, clients, both paths


def test_schema_and_openapi_declare_the_typed_apis(served, default_model: Path) -> None:
    classes = len(load_model_dir(default_model).class_names)
    routes = {r["name"]: r for r in httpx.get(f"{served.url}/schema.json", timeout=TIMEOUT).json()["routes"]}
    assert set(routes) == {"classify", "classify_pixels"}
    images = routes["classify"]["input"]["properties"]["images"]
    assert (images["type"], images["items"]["type"], images["items"]["content_type"]) == ("array", "file", "image/*")
    for name in routes:
        k = routes[name]["input"]["properties"]["k"]
        assert (k["type"], k["minimum"], k["maximum"], k["default"]) == ("integer", 1, classes, 3)
    pixels = routes["classify_pixels"]["input"]["properties"]["pixels"]
    assert (pixels["type"], pixels["dtype"], pixels["shape"]) == ("tensor", "uint8", [-1, 32, 32, 3])
    answer = routes["classify"]["output"]["items"]
    assert answer["$ref"].endswith("ImageAnswer") or answer.get("title") == "ImageAnswer"
    spec = httpx.get(f"{served.url}/docs.json", timeout=TIMEOUT).json()
    classify = spec["paths"]["/classify"]["post"]
    assert "multipart/form-data" in classify["requestBody"]["content"] and "raw body" in classify["description"]


def test_python_clients_answer_byte_for_byte_like_curl(served, images: list[Path]) -> None:
    """`client.classify(images=[Path], k=2)` gives what curl gives; so do the pixel route and the async client."""
    curl = _curl(f"{served.url}/classify?k=2", "-F", f"images=@{images[3]}", "-F", f"images=@{images[8]}")
    pixels = np.stack([np.asarray(Image.open(images[i]).convert("RGB")) for i in (0, 5)])
    curl_pixels = _curl(
        f"{served.url}/classify_pixels", "-H", "Content-Type: application/json",
        "--data-binary", json.dumps({"pixels": pixels.tolist(), "k": 4}),
    )  # fmt: skip
    with bentoml.SyncHTTPClient(served.url, server_ready_timeout=TIMEOUT) as client:
        sync = client.classify(images=[images[3], images[8]], k=2)
        sync_pixels = client.classify_pixels(pixels=pixels, k=4)

    async def call_async() -> list[dict]:
        async with bentoml.AsyncHTTPClient(served.url, server_ready_timeout=TIMEOUT) as client:
            return await client.classify(images=[images[3], images[8]], k=2)

    assert json.dumps(sync) == json.dumps(curl) == json.dumps(asyncio.run(call_async()))
    assert json.dumps(sync_pixels) == json.dumps(curl_pixels)
    assert [len(a["predictions"]) for a in sync] == [2, 2] and [a["file"] for a in sync] == [
        p.name for p in images[3:9:5]
    ]


def test_the_api_methods_called_in_python_answer_like_http(served, images: list[Path], tmp_path: Path) -> None:
    """The declared API methods (what `bentoml.depends` or a Python caller reaches) and the HTTP handlers
    (serving/api.py) are two ways into the same answers."""
    script = (
        "import asyncio, json, sys, time\n"
        "from pathlib import Path\n"
        "import numpy as np\n"
        "from serving.service import ClassifierService\n"
        "service = ClassifierService()\n"
        "while not service.ready: time.sleep(0.05)\n"
        "paths = [Path(p) for p in sys.argv[1:]]\n"
        "pixels = np.zeros((2, 32, 32, 3), np.uint8); pixels[1] = 200\n"
        "async def main():\n"
        "    return [await service.classify(images=paths, k=5), await service.classify_pixels(pixels=pixels, k=5)]\n"
        "print(json.dumps(asyncio.run(main())))\n"
    )
    in_python, pixels_in_python = json.loads(_python(script, *map(str, images), home=tmp_path / "home"))
    over_http = httpx.post(
        f"{served.url}/classify", files=[("images", (p.name, p.read_bytes(), "image/jpeg")) for p in images],
        data={"k": "5"}, timeout=TIMEOUT,
    ).json()  # fmt: skip
    pixels = np.zeros((2, 32, 32, 3), int)
    pixels[1] = 200
    pixels_over_http = httpx.post(
        f"{served.url}/classify_pixels", json={"pixels": pixels.tolist(), "k": 5}, timeout=TIMEOUT
    ).json()
    assert json.dumps(in_python) == json.dumps(over_http)
    assert json.dumps(pixels_in_python) == json.dumps(pixels_over_http)


def test_k_follows_one_rule_on_every_route(served, images: list[Path]) -> None:
    """`k` in the query string or in the body, on every route; both with different values is refused."""
    jpeg = images[0].read_bytes()
    files = [("images", ("a.jpg", jpeg, "image/jpeg"))]
    pixels = {"pixels": np.zeros((1, 32, 32, 3), int).tolist()}

    def labels(response: httpx.Response) -> int:
        assert response.status_code == 200, response.text
        return len(response.json()[0]["predictions"])

    post = lambda path, **kw: httpx.post(f"{served.url}{path}", timeout=TIMEOUT, **kw)
    assert labels(post("/classify?k=2", files=files)) == 2  # multipart, k in the query
    assert labels(post("/classify", files=files, data={"k": "4"})) == 4  # multipart, k in the form
    assert labels(post("/classify?k=4", files=files, data={"k": "4"})) == 4  # both, the same value
    raw = {"content": jpeg, "headers": {"Content-Type": "image/jpeg"}}
    assert labels(post("/classify?k=5", **raw)) == 5
    assert labels(post("/classify_pixels?k=6", json=pixels)) == 6
    assert labels(post("/classify_pixels", json={**pixels, "k": 7})) == 7
    assert labels(post("/classify", files=files)) == 3  # neither: the default
    for conflicting in (
        post("/classify?k=2", files=files, data={"k": "3"}),
        post("/classify_pixels?k=2", json={**pixels, "k": 3}),
    ):
        assert conflicting.status_code == 400 and "given twice" in conflicting.json()["error"], conflicting.text
    assert post("/classify?k=11", **raw).status_code == 400


def test_the_python_api_answers_like_the_service(served, images: list[Path], default_model: Path) -> None:
    """`Classifier.load(...).predict` on a path, bytes, a Pillow image and an array gives the service's answer."""
    classifier = Classifier.load(default_model, threads=1)
    over_http = httpx.post(
        f"{served.url}/classify?k=3", files=[("images", (p.name, p.read_bytes(), "image/jpeg")) for p in images],
        timeout=TIMEOUT,
    ).json()  # fmt: skip
    image = images[2]
    forms = [image, str(image), image.read_bytes(), Image.open(image), np.asarray(Image.open(image).convert("RGB"))]
    for form in forms:
        assert classifier.predict(form, k=3) == over_http[2]["predictions"], type(form)
    assert classifier.predict_batch(images, k=3) == [answer["predictions"] for answer in over_http]
    assert classifier.backend == httpx.get(f"{served.url}/model", timeout=TIMEOUT).json()["backend"]


# ------------------------------------------------------------------ the model store and the Bento


def test_the_served_model_is_in_the_model_store_with_labels_and_only_what_serving_runs(
    served, default_model: Path, images: list[Path]
) -> None:
    listed = json.loads(_bentoml(served.home, "models", "list", "-o", "json").stdout)
    (entry,) = [m for m in listed if m["tag"].startswith(f"{STORE_NAME}:")]
    tag = entry["tag"]
    info = json.loads(_bentoml(served.home, "models", "get", tag, "-o", "json").stdout)
    stored = served.home / "models" / info["name"] / info["version"]  # BentoML's store layout
    bundled = load_model_dir(default_model)
    labels = info["labels"]
    assert labels["architecture"] == bundled.manifest["architecture"] and labels["contract_version"] == "1"
    assert float(labels["test_accuracy_onnx_int8"]) == pytest.approx(
        bundled.manifest["test_accuracy"]["onnx_int8"], abs=1e-4
    )
    manifest = load_model_dir(stored).manifest
    assert set(manifest["artifacts"]) == set(TORCH_FREE_ARTIFACTS) & set(bundled.manifest["artifacts"])
    assert sorted(p.name for p in stored.iterdir() if p.suffix in (".ts", ".pt2")) == []
    assert manifest["left_out_of_store"]["artifacts"] == sorted(
        set(bundled.manifest["artifacts"]) - set(TORCH_FREE_ARTIFACTS)
    )
    # the same content imported again keeps its tag; the tag serves the same answers offline
    env = {"BENTOML_HOME": str(served.home)}
    again = run_module("serving.model_store", "import", str(default_model), env=env)
    assert again.stdout.strip().endswith(tag), again.stdout
    by_tag = run_module("serving.predict", "--model", tag, "--format", "json", str(images[0]), env=env)
    by_folder = run_module("serving.predict", "--model", str(default_model), "--format", "json", str(images[0]))
    assert json.loads(by_tag.stdout) == json.loads(by_folder.stdout)


def test_a_bento_carries_its_model_and_serves_from_another_folder_and_home(
    default_model: Path, images: list[Path], tmp_path: Path
) -> None:
    """`bentoml build` packs the served model and only what the Bento runs; exported, imported into an empty
    BENTOML_HOME and served from another folder (`bentoml serve cifar10-classifier:latest`), it classifies."""
    build_home, run_home, elsewhere = tmp_path / "build-home", tmp_path / "run-home", tmp_path / "elsewhere"
    elsewhere.mkdir()
    _bentoml(build_home, "build")
    (bento,) = json.loads(_bentoml(build_home, "list", "-o", "json").stdout)
    bento_dir = build_home / "bentos" / Path(bento["tag"].replace(":", "/"))  # BentoML's store layout
    services = (bento_dir / "bento.yaml").read_text()
    (stored,) = json.loads(_bentoml(build_home, "models", "list", "-o", "json").stdout)
    assert f"tag: {stored['tag']}" in services and bento["model_size"] == stored["size"], (bento, stored)
    files = [p.relative_to(bento_dir).as_posix() for p in bento_dir.rglob("*") if p.is_file()]
    assert not [f for f in files if f.startswith("src/exported_models") or f.endswith((".onnx", ".ts", ".pt2"))], files
    assert not [f for f in files if f.startswith(("src/trainer", "src/tests", "src/benchmarks"))], files
    _bentoml(build_home, "export", bento["tag"], str(tmp_path / "classifier.bento"))
    _bentoml(run_home, "import", str(tmp_path / "classifier.bento"))
    port = free_port()
    command = [sys.executable, "-m", "bentoml", "serve", f"{bento['tag'].split(':')[0]}:latest", "--host", "127.0.0.1"]
    env = {"BENTOML_HOME": str(run_home), "BENTOML_DO_NOT_TRACK": "1", "PYTHONPATH": ""}
    with ServedProcess([*command, "-p", str(port)], port, tmp_path / "bento.log", env, cwd=elsewhere) as bento_server:
        bento_server.wait_ready()
        answers = httpx.post(
            f"{bento_server.url}/classify?k=10",
            files=[("images", (p.name, p.read_bytes(), "image/jpeg")) for p in images], timeout=TIMEOUT,
        ).json()  # fmt: skip
        model_info = httpx.get(f"{bento_server.url}/model", timeout=TIMEOUT).json()
    expected = Classifier.load(default_model, threads=1).predict_batch(images, k=10)
    assert [a["predictions"] for a in answers] == expected
    assert set(model_info["artifacts"]) <= set(TORCH_FREE_ARTIFACTS)


# ------------------------------------------------------------------ installs and defaults


def test_serving_imports_no_torch_and_installs_without_it(tmp_path: Path) -> None:
    """The service, the Python API, the model store and the predictor import no torch, and `pip install .`
    (pyproject's dependencies, which `bentoml build` also puts in the Bento) asks for none of the training stack."""
    code = (
        "import sys, json\n"
        "import serving, serving.service, serving.model_store, serving.predict\n"
        "print(json.dumps(sorted({m.split('.')[0] for m in sys.modules} & {'torch', 'torchvision', 'trainer',"
        " 'matplotlib', 'onnx', 'onnxscript'})))\n"
    )
    assert json.loads(_python(code, home=tmp_path / "home")) == []
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    names = {
        dep.split(">")[0].split("=")[0].split(";")[0].split("[")[0].strip().lower() for dep in project["dependencies"]
    }
    assert not names & {"torch", "torchvision", "onnx", "onnxscript", "matplotlib"}, names
    assert {"torch", "torchvision"} <= {d.split(">")[0] for d in project["optional-dependencies"]["train"]}


def test_make_serve_binds_localhost_unless_told_and_takes_port_and_model() -> None:
    if shutil.which("make") is None:
        pytest.skip("make is not installed")

    def serve_line(*variables: str) -> str:
        dry = subprocess.run(["make", "-n", "serve", *variables], cwd=REPO, capture_output=True, text=True, check=True)
        (line,) = [line for line in dry.stdout.splitlines() if "bentoml serve" in line]
        return line

    assert serve_line().split("bentoml serve", 1)[1].split() == ["--host", "127.0.0.1", "--port", "3000"]
    custom = serve_line("HOST=0.0.0.0", "PORT=4000", "MODEL=exported_models/mine")
    assert custom.split("bentoml serve", 1)[1].split() == [
        "--host", "0.0.0.0", "--port", "4000", "--arg", "model=exported_models/mine",
    ]  # fmt: skip
