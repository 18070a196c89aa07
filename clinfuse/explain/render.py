"""Writing one explanation: explanation.json, image_attribution.npy, overlay.png, explanation.html."""

from __future__ import annotations

import base64
import html
import io
import json
from pathlib import Path

import numpy as np

__all__ = ["write_explanation", "overlay_png"]


def _2d(a: np.ndarray) -> np.ndarray:
    """A 2D view: the middle slice of a volume."""
    return a if a.ndim == 2 else a[a.shape[0] // 2]


def _method_label(image: dict) -> str:
    """'gradcam', 'occlusion' (black window) or 'occlusion, blurred window'."""
    m = str(image.get("method"))
    return m + (", blurred window" if m == "occlusion" and image.get("occlusion_baseline") == "blur" else "")


def overlay_png(image: np.ndarray, amap: np.ndarray, method: str, title: str) -> bytes:
    """The heatmap over the grey image, with a colour bar; PNG bytes."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    img, a = _2d(image), _2d(amap)
    fig, ax = plt.subplots(figsize=(4.6, 4.0))
    ax.imshow(img, cmap="gray", vmin=0, vmax=1)
    if method == "gradcam":
        im = ax.imshow(a, cmap="inferno", alpha=0.45, vmin=0, vmax=float(a.max()) or 1.0)
    else:
        lim = float(np.abs(a).max()) or 1.0
        im = ax.imshow(a, cmap="RdBu_r", alpha=0.55, vmin=-lim, vmax=lim)
    cb = fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04)
    cb.set_label("attribution to the target logit" if method != "gradcam" else "Grad-CAM (relu)")
    ax.set_title(title, fontsize=9)
    ax.axis("off")
    buf = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buf, format="png", dpi=100)
    plt.close(fig)
    return buf.getvalue()


def _without_html(exp: dict) -> str:
    """The explained probability with each present modality hidden in turn (two or more present)."""
    w = {k: v for k, v in (exp["modalities"].get("p_without") or {}).items() if v is not None}
    if not w:
        return ""
    t = exp["explained_output"]
    parts = ", ".join(f"{v:.3f} without the {html.escape(k)}" for k, v in w.items())
    return (f";<br>p({html.escape(t)}) {exp['probabilities'][t]:.3f} with everything shown, {parts}: how far this "
            "prediction depends on each")


def _variables_html(exp: dict) -> str:
    v = exp.get("variables")
    if not v:
        return ""
    rows = []
    for i in v["items"]:
        value = "missing" if i["value"] is None else html.escape(str(i["value"]))
        score = "" if i["score"] is None else f"{i['score']:+.4f}"
        rows.append(f"<tr><td>{html.escape(i['name'])}</td><td>{value}</td><td>{score}</td></tr>")
    rows = "".join(rows)
    return ("<h3>Structured variables</h3><p>Integrated Gradients on each value, from the training mean (positive: "
            "raised the explained output)</p><table><tr><th>variable</th><th>value</th><th>score</th></tr>"
            f"{rows}</table>")


def _word_html(tokens: list[tuple[str, float]]) -> str:
    if not tokens:
        return "<p><em>no report</em></p>"
    lim = max(abs(s) for _, s in tokens) or 1.0
    spans = []
    for w, s in tokens:
        a = min(1.0, abs(s) / lim)
        color = f"rgba(214,39,40,{a:.2f})" if s > 0 else f"rgba(31,119,180,{a:.2f})"
        spans.append(f'<span title="{s:+.4f}" style="background:{color};padding:1px 2px;border-radius:3px">'
                     f"{html.escape(w)}</span>")
    return "<p style='line-height:1.9'>" + " ".join(spans) + "</p>"


def write_explanation(out_dir: Path, exp: dict, image: np.ndarray | None, amap: np.ndarray | None,
                      images: dict | None = None, maps: dict | None = None) -> list[str]:
    """Write the files of one study's explanation; returns their names. With several images
    (`images`, `maps` per slot), each slot's map and overlay are written too."""
    out_dir.mkdir(parents=True, exist_ok=True)
    files = []
    png, overlays = overlays_of(exp, image, amap, images, maps)
    if png is not None:
        np.save(out_dir / "image_attribution.npy", amap.astype(np.float32))
        (out_dir / "overlay.png").write_bytes(png)
        files += ["image_attribution.npy", "overlay.png"]
    for j, m in (maps or {}).items():
        np.save(out_dir / f"image_attribution_{j}.npy", m.astype(np.float32))
        (out_dir / f"overlay_{j}.png").write_bytes(overlays[j])
        files += [f"image_attribution_{j}.npy", f"overlay_{j}.png"]
    (out_dir / "explanation.json").write_text(json.dumps(exp, indent=2))
    files.append("explanation.json")
    (out_dir / "explanation.html").write_text(explanation_html(exp, png, overlays), encoding="utf-8")
    files.append("explanation.html")
    return files


def _slot_of(amap, maps: dict | None) -> int | None:
    """The image slot whose map is the explanation's map (the first slot's: the same array), if any."""
    first = min(maps, default=None) if maps else None
    return first if first is not None and amap is not None and maps[first] is amap else None


def main_overlay(exp: dict, image, amap, images: dict | None, maps: dict | None) -> bytes | None:
    """The overlay of the explanation's map (overlay.png): its slot's overlay where it has one."""
    j = _slot_of(amap, maps)
    return overlay_of(exp, image, amap) if j is None else overlay_of(exp, images[j], amap, slot=j)


def overlays_of(exp: dict, image, amap, images: dict | None, maps: dict | None) -> tuple[bytes | None, dict]:
    """The overlay of the explanation's map and one per image slot; the map's slot is drawn once and
    serves as both."""
    overlays = {j: overlay_of(exp, images[j], m, slot=j) for j, m in (maps or {}).items()}
    j = _slot_of(amap, maps)
    return (overlay_of(exp, image, amap) if j is None else overlays[j]), overlays


def overlay_of(exp: dict, image: np.ndarray | None, amap: np.ndarray | None, slot: int | None = None) -> bytes | None:
    """The overlay PNG of an explanation's image map (None without an image or a map)."""
    if amap is None or image is None:
        return None
    target = exp["explained_output"]
    which = ""
    if slot is not None:
        view = next((i["view"] for i in exp.get("images", []) if i["slot"] == slot), "")
        which = f", image {slot + 1}" + (f" ({view})" if view else "")
    return overlay_png(image, amap, exp["image"]["method"],
                       f"{exp['study_id']}{which}: p({target}) = {exp['probabilities'][target]:.3f}")


UNSTEADY_FIRST_STEP = 0.1  # |change in p| when 10% of the patches go at random, above which the test is in doubt


def _faith_line(name: str, f: dict) -> str:
    flag = "better than random" if f["better_than_random"] else "<b>NOT better than random: do not rely on this map</b>"
    how = {"zero": "; removed patches blacked out", "inpaint": "; removed patches in-painted"}.get(f.get("fill"), "")
    step = f.get("random_first_step")
    doubt = ""
    if step is not None and "fill" in f and abs(step) > UNSTEADY_FIRST_STEP:  # image maps only
        doubt = (f" <b>Removing 10% of the patches at random already moves p by {step:+.2f}: the verdict says more "
                 f"about how the model reads removed patches than about the map.</b>")
    return (f"<li>{html.escape(name)}: deletion area {f['deletion_area']:.3f} vs random {f['random_area']:.3f} "
            f"(faithfulness {f['faithfulness']:+.3f}; {flag}{how}).{doubt}</li>")


def explanation_html(exp: dict, png: bytes | None, overlays: dict | None = None) -> str:
    """The self-contained HTML page of one explanation (the overlays inlined; `overlays` per image
    slot for a study of several images, else the one `png`)."""
    png_b64 = base64.b64encode(png).decode() if png else ""
    probs = "".join(f"<tr><td>{html.escape(k)}</td><td>{v:.3f}</td><td>{'yes' if exp['predicted'][k] else 'no'}</td>"
                    f"</tr>" for k, v in exp["probabilities"].items())
    mod = exp["modalities"]
    faith = []
    if exp.get("images"):
        for i in exp["images"]:
            if i.get("faithfulness"):
                faith.append(_faith_line(f"image {i['slot'] + 1} {i['view']}".strip(), i["faithfulness"]))
    elif exp["image"].get("faithfulness"):
        faith.append(_faith_line("image", exp["image"]["faithfulness"]))
    if exp["report"].get("faithfulness"):
        faith.append(_faith_line("report", exp["report"]["faithfulness"]))
    if overlays:
        img_html = "".join(f'<figure><img alt="attribution overlay, image {j + 1}" src="data:image/png;base64,'
                           f'{base64.b64encode(o).decode()}"></figure>' for j, o in sorted(overlays.items()) if o)
    else:
        img_html = f'<img alt="attribution overlay" src="data:image/png;base64,{png_b64}">' if png_b64 else \
            "<p><em>no image</em></p>"
    att = ", ".join(f"{html.escape(g)} {v:.2f}" for g, v in mod["attention"].items())
    shap = ", ".join(f"{html.escape(g)} {v:+.3f}" for g, v in mod["shapley"].items())
    share = ", ".join(f"{html.escape(g)} {v:.0%}" for g, v in mod["share"].items())
    page = f"""<!doctype html><html><head><meta charset="utf-8"><title>clinfuse explanation {html.escape(exp['study_id'])}</title>
<style>body{{font-family:system-ui,sans-serif;max-width:980px;margin:1.5em auto;color:#222}}
table{{border-collapse:collapse}}td,th{{border:1px solid #ccc;padding:3px 8px}}.cols{{display:flex;gap:2em}}</style></head><body>
<h2>Study {html.escape(exp['study_id'])}</h2>
<p>Model {html.escape(str(exp['model'].get('uri') or exp['model'].get('dir')))} (version {html.escape(str(exp['model'].get('version') or '—'))});
explained output: <b>{html.escape(exp['explained_output'])}</b>; operating point from validation.</p>
<table><tr><th>output</th><th>probability</th><th>predicted</th></tr>{probs}</table>
<h3>Modalities</h3><p>attention weight: {att};
Shapley value on the probability: {shap}
(share: {share}){_without_html(exp)}</p>
<div class="cols"><div><h3>Image ({html.escape(_method_label(exp['image']))})</h3>{img_html}</div>
<div><h3>Report</h3><p>red: words that raised the explained output, blue: words that lowered it</p>{_word_html([tuple(t) for t in exp['report']['words']])}</div></div>
{_variables_html(exp)}
<h3>How far to trust these maps</h3><ul>{''.join(faith) or '<li>nothing to measure</li>'}</ul>
<p style="font-size:small">Integrated Gradients convergence delta: {exp['convergence_delta']}. A heatmap shows where the model's
output is sensitive, not where disease is; see docs/explanations.md.</p></body></html>"""
    return page
