"""The review page (/review/ui/, services/review_page.py, viewer/) driven in a real browser against
the real service: Debian's Chromium through Playwright, `bentoml serve` with a tiny trained model,
the real review API (services/review_api.py) and feedback store.

One stack for the module: three scans segmented (every case is queued:
KUBESEG_REVIEW_CONFIDENCE_BELOW=1; the third through /segment with a saliency map), then in the
browser: the queue in the API's order; one case's overlay compared pixel by pixel with the label
map's slice (SimpleITK's geometry, not NiiVue's); the saliency layer; approve; reject (a reason is
required); correct by painting with the mouse, after which the label map in the feedback store is
on the input's grid and differs from the prediction only on the painted stroke.

``KUBESEG_REVIEW_SCREENSHOT=path.png`` also saves a screenshot of the page (README: docs/review-page.png).
"""

from __future__ import annotations

import io
import json
import os
import shutil
import subprocess
import zipfile
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from services import review_page
from services.auth import new_key
from tests.services.servers import bentoml_server, http_get

CHROMIUM = os.environ.get("KUBESEG_TEST_CHROMIUM") or shutil.which("chromium") or "/usr/bin/chromium"
REPO = Path(__file__).resolve().parents[2]
API_KEY, API_KEY_LINE = new_key("review-test")
WHO = "api-key:review-test"
# The review test needs a model that finds the body (labels on the slice to compare), nothing more.
# (A better-trained model covers the whole central area of its fullest slice with body: no background
# left to paint on. The model is trained once per test process: tests/pipelines/helpers.tiny_bundle.)
REVIEW_SCHEDULE = (4, 8, 1)
TOLERANCE = 12  # per RGB channel, 0-255: screenshots are exact, but edges are blended (interior only below)


def _skip_reasons() -> str | None:
    if not Path(CHROMIUM).is_file():
        return "Debian's chromium is not installed (.ci/run installs it)"
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        return "playwright (the test extra) is not installed"
    if not review_page.built() and shutil.which("npm") is None:
        return "the review page is not built and npm is missing (make viewer; Debian: nodejs npm)"
    return None


# -- the page's files and who may fetch them (fast, no server) -----------------------------------------
def test_the_authentication_opens_the_page_files_and_nothing_else():
    from services.auth import Authenticator
    from services.settings import AuthSettings

    auth = Authenticator(AuthSettings())
    assert all(auth.is_open(p) for p in review_page.SHELL_PATHS)
    assert set(review_page.SHELL_PATHS) == {"/review/ui", "/review/ui/", "/review/ui/index.html",
                                            "/review/ui/review.js", "/review/ui/review.css"}
    for path in ("/review", "/review/queue", "/review/cases/x/segmentation", "/review/ui/other.js", "/feedback",
                 "/review/ui/../queue", "/review/ui//review.js"):
        assert not auth.is_open(path), path


def test_the_page_app_serves_the_bundle_with_its_headers(tmp_path, monkeypatch):
    from starlette.testclient import TestClient

    monkeypatch.setattr(review_page, "BUNDLE", tmp_path)
    client = TestClient(review_page.ui_app())
    r = client.get("/ui/")
    assert r.status_code == 503 and "make viewer" in r.json()["error"]
    for name in review_page.SHELL_FILES:
        (tmp_path / name).write_text(f"/* {name} */" + " " * 2000)
    r = client.get("/ui/", headers={"Accept-Encoding": "gzip"})
    assert r.status_code == 200 and r.text.startswith("/* index.html */")
    assert r.headers["content-type"].startswith("text/html") and r.headers["content-encoding"] == "gzip"
    assert "script-src 'self'" in r.headers["content-security-policy"] and r.headers["x-content-type-options"] == "nosniff"
    assert client.get("/ui/review.js").headers["content-type"].startswith("text/javascript")
    r = client.get("/ui", follow_redirects=False)
    assert r.status_code == 308 and r.headers["location"].endswith("/ui/")
    assert client.get("/ui/secret.txt").status_code == 404
    assert client.post("/ui/").status_code == 405


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    reason = _skip_reasons()
    if reason:
        pytest.skip(reason)
    if not review_page.built():
        subprocess.run(["make", "-s", "viewer"], cwd=REPO, check=True, timeout=600)
    import torch

    from kubeseg.signing import generate_keys, sign_bundle
    from tests.services.helpers import served_bundle

    root = tmp_path_factory.mktemp("review-page")
    cached = os.environ.get("KUBESEG_TEST_REVIEW_MODEL_DIR")  # reuse a trained model between local runs
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        model_dir = Path(cached) if cached else root / "model"
        made = served_bundle(model_dir, REVIEW_SCHEDULE) if not (model_dir / "bundle").is_dir() else {
            "raw": model_dir / "raw" / "Dataset001_SynthCT", "bundle": model_dir / "bundle"}
    finally:
        torch.set_num_threads(threads)
    bundle = root / "bundle"
    shutil.copytree(made["bundle"], bundle)
    signing_key, public_key = generate_keys(root / "signing")
    sign_bundle(bundle, signing_key)
    env = {"KUBESEG_MODEL_BUNDLE": str(bundle), "KUBESEG_MODEL_PUBLIC_KEY": str(public_key),
           "KUBESEG_API_KEYS": API_KEY_LINE, "KUBESEG_DEVICE": "cpu", "KUBESEG_TTA": "false",
           "KUBESEG_REVIEW_QUEUE_DIR": str(root / "queue"), "KUBESEG_FEEDBACK_STORE": str(root / "feedback"),
           "KUBESEG_REVIEW_CONFIDENCE_BELOW": "1.0", "KUBESEG_CACHE_DIR": str(root / "cache"),
           "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    with bentoml_server(root, env) as service:
        cases = sorted((made["raw"] / "imagesTs").iterdir())[:3]
        if len(cases) < 3:
            cases = (cases + sorted((made["raw"] / "imagesTr").iterdir()))[:3]
        ids = []
        for n, case in enumerate(cases):
            files = [("images", (case.name, case.read_bytes(), "application/octet-stream"))]
            if n < 2:
                r = _client().post(f"{service.url}/segment_summary", timeout=300, files=files)
                assert r.status_code == 200, r.text[:300]
                ids.append(r.json()["qa"]["review_id"])
            else:  # the third with a saliency map (a zip: label map, saliency NIfTI and PNG, summary.json)
                r = _client().post(f"{service.url}/segment", timeout=300, files=files, data={"saliency": "true"})
                assert r.status_code == 200, r.text[:300]
                with zipfile.ZipFile(io.BytesIO(r.content)) as z:
                    ids.append(json.loads(z.read("summary.json"))["qa"]["review_id"])
        yield {"url": service.url, "root": root, "ids": ids, "cases": dict(zip(ids, cases)), "service": service}


def _client():
    import httpx

    return httpx.Client(headers={"Authorization": f"Bearer {API_KEY}"})


def _get_json(stack, path: str):
    r = _client().get(f"{stack['url']}{path}", timeout=30)
    assert r.status_code == 200, (path, r.status_code, r.text[:300])
    return r.json()


@pytest.mark.integration
def test_the_page_is_open_its_data_is_not(stack):
    url = stack["url"]
    import httpx

    page = httpx.get(f"{url}/review/ui/", timeout=10)
    assert page.status_code == 200 and "text/html" in page.headers["content-type"]
    assert "frame-ancestors 'none'" in page.headers["content-security-policy"]
    assert '<script type="module" src="review.js">' in page.text
    assert httpx.get(f"{url}/review/ui/review.js", timeout=10).status_code == 200
    redirect = httpx.get(f"{url}/review/ui", timeout=10)
    assert redirect.status_code == 308 and redirect.headers["location"].endswith("/review/ui/")
    # only the page's own files are open: the API and anything else under /review need the credential
    for path in ("/review/queue", f"/review/cases/{stack['ids'][0]}", f"/review/cases/{stack['ids'][0]}/segmentation",
                 "/review/ui/other.js", "/review/ui/../queue"):
        assert http_get(f"{url}{path}")[0] == 401, path


# -- the browser ----------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def page(stack):
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM,
                                    args=["--use-angle=swiftshader", "--enable-unsafe-swiftshader"])
        try:
            context = browser.new_context(viewport={"width": 1400, "height": 820}, device_scale_factor=1)
            pg = context.new_page()
            errors: list[str] = []
            pg.on("pageerror", lambda e: errors.append(str(e)))
            pg.goto(f"{stack['url']}/review/ui/")
            pg.wait_for_selector("body[data-state=needs-key]")
            pg.fill("#key", API_KEY)
            pg.click("#key-form button[type=submit]")
            pg.wait_for_selector("#queue tbody tr[data-id]")
            pg.errors = errors
            yield pg
        finally:
            browser.close()


def _open(pg, case_id: str) -> None:
    pg.click(f"#queue tbody tr[data-id='{case_id}']")
    pg.wait_for_selector("body[data-state=case]", timeout=60000)
    assert pg.inner_text("#case-title").startswith(f"Case {case_id[:12]}")


def _axial_tile(pg) -> dict:
    tiles = pg.evaluate("window.kubesegReview.nv.screenSlices.map(s => ({ltwh: s.leftTopWidthHeight, "
                        "mm: s.leftTopMM, fov: s.fovMM, kind: s.axCorSag}))")
    (tile,) = [t for t in tiles if t["kind"] == 0]
    return tile


def _show_slice(pg, seg: sitk.Image, k: int) -> None:
    """Move NiiVue's crosshair to the centre of slice k (the label map's z index) and hide it."""
    centre = seg.TransformContinuousIndexToPhysicalPoint([(seg.GetSize()[0] - 1) / 2, (seg.GetSize()[1] - 1) / 2, k])
    ras = [-centre[0], -centre[1], centre[2]]  # ITK's LPS to NIfTI's RAS world
    pg.evaluate("""([mm]) => { const nv = window.kubesegReview.nv;
        nv.setCrosshairWidth(0); nv.scene.crosshairPos = nv.mm2frac(mm); nv.drawScene(); }""", [ras])


def _screen_labels(tile: dict, seg: sitk.Image, labels: np.ndarray, k: int, z_mm: float, shape) -> np.ndarray:
    """For every canvas pixel: the label map's value under its centre (-1 outside the tile or image)."""
    left, top, width, height = tile["ltwh"]
    ys, xs = np.mgrid[0:shape[0], 0:shape[1]] + 0.5
    fx, fy = (xs - left) / width, (top + height - ys) / height
    inside = (fx >= 0) & (fx < 1) & (fy >= 0) & (fy < 1)
    ras_x = tile["mm"][0] + fx * tile["fov"][0]
    ras_y = tile["mm"][1] + fy * tile["fov"][1]
    # RAS world -> LPS -> continuous index, by the label map's own geometry (SimpleITK)
    origin = np.array(seg.GetOrigin())
    m = np.array(seg.GetDirection()).reshape(3, 3) @ np.diag(seg.GetSpacing())
    lps = np.stack([-ras_x, -ras_y, np.full_like(ras_x, z_mm)], -1) - origin
    index = np.rint(lps @ np.linalg.inv(m).T).astype(int)
    size = np.array(seg.GetSize())
    inside &= np.all((index >= 0) & (index < size), -1) & (index[..., 2] == k)
    out = np.full(shape, -1, int)
    i = index[inside]
    out[inside] = labels[i[:, 2], i[:, 1], i[:, 0]]
    return out, index


def _canvas_xy(tile: dict, seg: sitk.Image, index) -> tuple[float, float]:
    """Where on the canvas (pixels from its top left) a voxel centre of the axial tile is drawn."""
    left, top, width, height = tile["ltwh"]
    p = seg.TransformContinuousIndexToPhysicalPoint([float(v) for v in index])
    fx = (-p[0] - tile["mm"][0]) / tile["fov"][0]
    fy = (-p[1] - tile["mm"][1]) / tile["fov"][1]
    return left + fx * width, top + height - fy * height


def _canvas_shot(pg) -> np.ndarray:
    from io import BytesIO

    from PIL import Image  # matplotlib's dependency

    return np.asarray(Image.open(BytesIO(pg.locator("#gl").screenshot())).convert("RGB")).astype(int)


def _set_opacity(pg, value: float) -> None:
    pg.fill("#opacity", str(value))
    pg.wait_for_timeout(300)


@pytest.mark.integration
def test_the_queue_and_the_overlay(stack, page):
    from scipy import ndimage

    pg = page
    listed = _get_json(stack, "/review/queue")["items"]
    rows = pg.eval_on_selector_all("#queue tbody tr[data-id]", "rows => rows.map(r => r.dataset.id)")
    assert rows == [i["id"] for i in listed] and set(stack["ids"]) <= set(rows)
    case_id = stack["ids"][0]
    case = _get_json(stack, f"/review/cases/{case_id}")
    _open(pg, case_id)
    facts = pg.inner_text("#facts")
    assert f"v{case['model']['version']}" in facts and str(round(case["confidence"], 3)) in facts
    assert all(f["flag"] in facts for f in (case.get("qa") or {}).get("flags", []))
    legend = pg.inner_text("#legend")
    assert all(name in legend for value, name in case["labels"].items() if int(value) > 0)

    seg_path = stack["root"] / "seg.nii.gz"
    r = _client().get(f"{stack['url']}/review/cases/{case_id}/segmentation", timeout=30)
    seg_path.write_bytes(r.content)
    seg = sitk.ReadImage(str(seg_path))
    labels = sitk.GetArrayFromImage(seg)
    assert labels.max() > 0, "the tiny model predicted no label at all"
    k = int(np.argmax((labels > 0).sum(axis=(1, 2))))
    _show_slice(pg, seg, k)
    z_mm = seg.TransformIndexToPhysicalPoint([0, 0, k])[2]
    _set_opacity(pg, 1.0)
    with_overlay = _canvas_shot(pg)
    _set_opacity(pg, 0.0)
    plain = _canvas_shot(pg)
    tile = _axial_tile(pg)
    screen, _ = _screen_labels(tile, seg, labels, k, z_mm, with_overlay.shape[:2])
    # compare inside regions only: a pixel whose 5 x 5 neighbourhood has one label value
    steady = ndimage.minimum_filter(screen, 5) == ndimage.maximum_filter(screen, 5)
    background = steady & (screen == 0)
    assert background.sum() > 500
    same = np.abs(with_overlay - plain).max(-1) <= TOLERANCE
    assert same[background].mean() > 0.99, "overlay colour where the label map has no label"
    checked = 0
    for value in np.unique(labels[k]):
        if value == 0:
            continue
        where = steady & (screen == value)
        colour = np.array(pg.evaluate("v => window.kubesegReview.labelColour(v)", int(value)))
        swatch = pg.eval_on_selector(f"#legend li[data-label='{value}'] .swatch", "e => getComputedStyle(e).backgroundColor")
        assert swatch == f"rgb({colour[0]}, {colour[1]}, {colour[2]})"
        if where.sum() < 20:
            continue  # a few voxels: too small on screen to compare interiors
        coloured = np.abs(with_overlay - colour).max(-1) <= TOLERANCE
        assert coloured[where].mean() > 0.97, (value, coloured[where].mean())
        checked += 1
    assert checked >= 1
    stack["shown"] = {"case": case_id}
    shot = os.environ.get("KUBESEG_REVIEW_SCREENSHOT")
    if shot:
        _set_opacity(pg, 0.6)
        pg.screenshot(path=shot)
    assert pg.errors == []


@pytest.mark.integration
def test_approve_and_reject(stack, page):
    pg = page
    approve_id, reject_id = stack["ids"][0], stack["ids"][2]
    _open(pg, approve_id)
    pg.click("#approve")
    pg.wait_for_selector("body[data-state=sent]")
    assert "approve recorded" in pg.inner_text("#message") and WHO in pg.inner_text("#message")
    case = _get_json(stack, f"/review/cases/{approve_id}")
    assert case["status"] == "approved" and case["review"]["by"] == WHO
    assert pg.inner_text(f"#queue tbody tr[data-id='{approve_id}'] td:last-child") == "approved"

    _open(pg, reject_id)  # the case with a saliency map: a layer the reviewer can show
    assert _get_json(stack, f"/review/cases/{reject_id}")["saliency"] is True
    assert pg.is_visible("#saliency-toggle") and "computed" in pg.inner_text("#facts")
    before = _canvas_shot(pg)
    pg.check("#saliency")
    pg.wait_for_timeout(300)
    assert np.abs(_canvas_shot(pg) - before).max(-1).astype(bool).mean() > 0.01  # the heat map shows
    pg.uncheck("#saliency")
    pg.click("#reject")  # no reason: refused by the page, nothing sent
    assert "needs a reason" in pg.inner_text("#message")
    assert _get_json(stack, f"/review/cases/{reject_id}")["status"] == "pending"
    pg.fill("#reason", "motion artefact")
    pg.click("#reject")
    pg.wait_for_selector("body[data-state=sent]")
    case = _get_json(stack, f"/review/cases/{reject_id}")
    assert case["status"] == "rejected" and case["review"]["stored_as"] is None
    assert pg.errors == []


@pytest.mark.integration
def test_correct_by_painting(stack, page):
    pg = page
    case_id = stack["ids"][1]
    _open(pg, case_id)
    seg_path = stack["root"] / "predicted.nii.gz"
    seg_path.write_bytes(_client().get(f"{stack['url']}/review/cases/{case_id}/segmentation", timeout=30).content)
    seg = sitk.ReadImage(str(seg_path))
    predicted = sitk.GetArrayFromImage(seg)
    k = int(np.argmax((predicted > 0).sum(axis=(1, 2))))
    _show_slice(pg, seg, k)
    z_mm = seg.TransformIndexToPhysicalPoint([0, 0, k])[2]
    tile = _axial_tile(pg)
    box = pg.locator("#gl").bounding_box()
    shape = (int(round(box["height"])), int(round(box["width"])))
    screen, index = _screen_labels(tile, seg, predicted, k, z_mm, shape)
    # a horizontal stroke through background: the longest run of label-0 pixels on one row of the
    # tile's central half, middle part
    left, top, width, height = (int(v) for v in tile["ltwh"])
    central = np.zeros(shape, bool)
    central[top + height // 4:top + 3 * height // 4, left + width // 4:left + 3 * width // 4] = True
    best = (0, 0, 0)
    for y in range(shape[0]):
        row = np.concatenate([[False], (screen[y] == 0) & central[y], [False]])
        edges = np.flatnonzero(np.diff(row.astype(int)))
        for a, b in zip(edges[::2], edges[1::2]):
            if b - a > best[2] - best[1]:
                best = (y, a, b)
    y, a, b = best
    assert b - a > 40
    # the stroke runs along voxel centres (no pixel-rounding ambiguity): row j, columns i0..i1
    _, j, _ = index[y, (a + b) // 2]
    i_start, i_end = sorted((index[y, a + (b - a) // 4][0], index[y, a + (b - a) // 2][0]))
    painted = {(int(i), int(j), k) for i in range(i_start, i_end + 1)}
    assert len(painted) >= 3 and all(predicted[k, j, i] == 0 for i, j, _ in painted)
    pen = int(sorted(int(v) for v in _foreground_labels(stack, case_id))[0])
    pg.check("#edit")
    pg.select_option("#pen", str(pen))
    (x0, y0), (x1, y1) = (_canvas_xy(tile, seg, (i, j, k)) for i in (i_start, i_end))
    pg.mouse.move(box["x"] + x0, box["y"] + y0)
    pg.mouse.down()
    pg.mouse.move(box["x"] + x1, box["y"] + y1, steps=12)
    pg.mouse.move(box["x"] + x1 + 1, box["y"] + y1)
    pg.mouse.up()
    pg.click("#submit-correction")
    pg.wait_for_selector("body[data-state=sent]", timeout=60000)
    case = _get_json(stack, f"/review/cases/{case_id}")
    assert case["status"] == "corrected" and case["review"]["by"] == WHO
    stored = stack["root"] / "feedback" / "labelsTr" / f"{case['review']['stored_as']}.nii.gz"
    assert stored.is_file(), sorted(p.name for p in (stack["root"] / "feedback").rglob("*"))
    label = sitk.ReadImage(str(stored))
    image = sitk.ReadImage(str(stack["cases"][case_id]))
    assert label.GetSize() == image.GetSize()
    assert np.allclose(label.GetSpacing(), image.GetSpacing(), atol=1e-5)
    assert np.allclose(label.GetOrigin(), image.GetOrigin(), atol=1e-4)
    assert np.allclose(label.GetDirection(), image.GetDirection(), atol=1e-6)
    corrected = sitk.GetArrayFromImage(label)
    # NiiVue draws the pen line up to the pointer events it has processed; synthetic events fired
    # quickly can leave the stroke's last voxel(s) unpainted. So: every changed voxel lies on the
    # stroke (a flipped or shifted grid would put them elsewhere), holds the pen's label, the stroke's
    # first voxel (the mouse-down) is among them, and so is most of the stroke
    changed = {(int(i), int(j), int(kk)) for kk, j, i in zip(*np.nonzero(corrected != predicted))}
    assert changed <= painted, (sorted(changed - painted)[:10], sorted(painted))
    assert (int(i_start), int(j), k) in changed and len(changed) >= max(3, len(painted) // 2), \
        (sorted(changed), sorted(painted))
    assert all(corrected[kk, j, i] == pen for i, j, kk in changed)
    assert pg.errors == []


def _foreground_labels(stack, case_id: str) -> list[str]:
    return [v for v in _get_json(stack, f"/review/cases/{case_id}")["labels"] if int(v) > 0]
