"""The converter's report plots kept beside a published bundle (``/api/v1/admin/bundles/{name}/{version}/plots``).

Operators upload them (``edgefleet-convert publish --server`` does), anyone with a key reads them; only a
bounded PNG is taken, for a published version, and they go with the bundle record.
"""

from __future__ import annotations

import pytest
from sqlalchemy import select

from fleet_server.models import AuditEntry, BundlePlot
from fleet_server.services.plots import MAX_PLOT_BYTES
from tests.fleet_server.conftest import png_image

PLOTS = "/api/v1/admin/bundles/tiny/1/plots"
PNG = {"Content-Type": "image/png"}


@pytest.fixture
def published(release) -> None:
    release.publish("tiny", 1)


def test_an_operator_uploads_a_plot_and_a_viewer_reads_the_same_bytes(
    client, published, operator_headers, viewer_headers, session_factory
):
    image = png_image(60, 30)
    assert client.put(f"{PLOTS}/report", content=image, headers={**operator_headers, **PNG}).status_code == 204
    answer = client.get(f"{PLOTS}/report", headers=viewer_headers)
    assert answer.status_code == 200 and answer.headers["content-type"] == "image/png"
    assert answer.content == image
    with session_factory() as session:
        entry = session.scalars(select(AuditEntry).where(AuditEntry.action == "bundle.plot")).one()
    assert entry.target_id == "tiny@1:report" and entry.before is None and entry.after["bytes"] == len(image)


def test_a_second_upload_replaces_the_plot(client, published, operator_headers, session_factory):
    for colour in ((0, 0, 0), (255, 255, 255)):
        image = png_image(rgb=colour)
        assert client.put(f"{PLOTS}/agreement", content=image, headers={**operator_headers, **PNG}).status_code == 204
    assert client.get(f"{PLOTS}/agreement", headers=operator_headers).content == image
    with session_factory() as session:
        assert len(session.scalars(select(BundlePlot)).all()) == 1


def test_a_viewer_cannot_upload(client, published, viewer_headers):
    assert client.put(f"{PLOTS}/report", content=png_image(), headers={**viewer_headers, **PNG}).status_code == 403


@pytest.mark.parametrize(
    ("body", "message"),
    [
        (b"<svg onload=alert(1)></svg>", "a plot must be a PNG image"),
        (b"\x89PNG\r\n\x1a\n", "a plot must be a PNG image"),
        (png_image(9000, 1)[:40], "9000x1 pixels is outside 1..8000"),
    ],
)
def test_anything_but_a_png_of_sensible_size_is_a_400(client, published, operator_headers, body, message):
    answer = client.put(f"{PLOTS}/report", content=body, headers={**operator_headers, **PNG})
    assert answer.status_code == 400 and message in answer.json()["detail"]


def test_a_plot_over_its_limit_is_a_413_even_where_the_servers_body_limit_is_higher(
    client, app, published, operator_headers
):
    app.state.settings.max_json_bytes = 8 * MAX_PLOT_BYTES  # the request guard lets it through
    body = png_image()[:33] + b"\0" * MAX_PLOT_BYTES
    answer = client.put(f"{PLOTS}/report", content=body, headers={**operator_headers, **PNG})
    assert answer.status_code == 413 and f"over the limit of {MAX_PLOT_BYTES} bytes" in answer.json()["detail"]


def test_unknown_kinds_versions_and_plots_are_refused(client, published, operator_headers):
    headers = {**operator_headers, **PNG}
    assert client.put(f"{PLOTS}/latency", content=png_image(), headers=headers).status_code == 422
    unpublished = client.put("/api/v1/admin/bundles/tiny/2/plots/report", content=png_image(), headers=headers)
    assert unpublished.status_code == 404
    missing = client.get(f"{PLOTS}/report", headers=operator_headers)
    assert missing.status_code == 404 and "has no report plot" in missing.json()["detail"]


def test_deleting_the_bundle_deletes_its_plots(client, published, operator_headers, session_factory):
    assert client.put(f"{PLOTS}/report", content=png_image(), headers={**operator_headers, **PNG}).status_code == 204
    assert client.delete("/api/v1/admin/bundles/tiny/1", headers=operator_headers).status_code == 204
    with session_factory() as session:
        assert session.scalars(select(BundlePlot)).all() == []
