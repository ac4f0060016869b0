#!/usr/bin/env python3
"""Reference values for `her2map evaluate --json` (tests/it/evaluate.rs).

Reads a batch results CSV and a label CSV the way the Rust side documents
(join on patient_id; `her2`, or `ihc` + `ish` by the ASCO/CAP rule), and
computes every deterministic statistic with independent implementations:
scikit-learn (roc_auc_score, roc_curve, brier_score_loss,
calibration_curve, confusion_matrix), MLstatkit (DeLong: the AUROC
interval and the paired test, Sun & Xu's algorithm in float64) and
statsmodels (Wilson). (confidenceinterval's DeLong keeps its midranks in
float32, which moves the interval by ~1e-7: not a 1e-9 reference.)

usage: evaluate_reference.py RESULTS.csv LABELS.csv THRESHOLD TARGET_SENS [--by COL] [--compare OTHER.csv]
"""
import argparse
import csv
import json
import math

import numpy as np
from sklearn.calibration import calibration_curve
from sklearn.metrics import brier_score_loss, confusion_matrix, roc_auc_score, roc_curve
from statsmodels.stats.proportion import proportion_confint
from MLstatkit import Delong_test


def status(label):
    her2 = label.get("her2", "").strip().lower()
    if her2:
        return her2 == "positive"
    ihc = label.get("ihc", "").strip().rstrip("+")
    if ihc == "3":
        return True
    if ihc in ("0", "1"):
        return False
    if ihc == "2":
        ish = label.get("ish", "").strip().lower()
        return {"positive": True, "negative": False}.get(ish)
    return None


def wilson(k, n):
    if n == 0:
        return None
    lo, hi = proportion_confint(k, n, alpha=0.05, method="wilson")
    return [float(lo), float(hi)]


def stats(y, p, threshold, target):
    y = np.asarray(y, dtype=int)
    p = np.asarray(p, dtype=float)
    out = {"n": int(len(y)), "positives": int(y.sum()), "negatives": int(len(y) - y.sum())}
    pred = (p >= threshold).astype(int)
    tn, fp, fn, tp = confusion_matrix(y, pred, labels=[0, 1]).ravel()
    tn, fp, fn, tp = int(tn), int(fp), int(fn), int(tp)
    out.update({"tp": tp, "fp": fp, "tn": tn, "fn": fn})
    for name, k, n in [("sensitivity", tp, tp + fn), ("specificity", tn, tn + fp),
                       ("ppv", tp, tp + fp), ("npv", tn, tn + fn)]:
        out[name] = k / n if n else None
        out[name + "_ci"] = wilson(k, n)
    out["brier"] = float(brier_score_loss(y, p))
    prob_true, prob_pred = calibration_curve(y, p, n_bins=10, strategy="uniform")
    out["calibration"] = [[float(a), float(b)] for a, b in zip(prob_pred, prob_true)]
    if 0 < y.sum() < len(y):
        out["auroc"] = float(roc_auc_score(y, p))
        # The interval of score A; B (the reversed score) only keeps the
        # paired variance away from zero, which would switch MLstatkit to
        # its bootstrap.
        _, _, ci_a, _, auc_a, _, info = Delong_test(y, p, 1.0 - p)
        assert info["method"] == "delong"
        out["auroc_delong"] = float(auc_a)
        out["auroc_ci"] = [float(ci_a[0]), float(ci_a[1])]
        fpr, tpr, thr = roc_curve(y, p, drop_intermediate=False)
        out["roc"] = [[None if math.isinf(t) else float(t), float(f), float(s)] for t, f, s in zip(thr, fpr, tpr)]
        j = tpr - fpr
        i = int(np.argmax(j))
        out["youden"] = {"threshold": float(thr[i]), "sensitivity": float(tpr[i]), "specificity": float(1 - fpr[i])}
        i = int(np.argmax(tpr >= target))
        out["target_sensitivity"] = {"threshold": float(thr[i]), "sensitivity": float(tpr[i]), "specificity": float(1 - fpr[i])}
    else:
        out["auroc"] = None
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("results")
    ap.add_argument("labels")
    ap.add_argument("threshold", type=float)
    ap.add_argument("target", type=float)
    ap.add_argument("--by", action="append", default=[])
    ap.add_argument("--compare")
    a = ap.parse_args()
    with open(a.results, newline="") as f:
        rows = list(csv.DictReader(f))
    with open(a.labels, newline="") as f:
        labels = {r["patient_id"]: r for r in csv.DictReader(f)}
    cases = []
    unmatched = failed = 0
    for r in rows:
        if r["error"] or not r["prob"]:
            failed += 1
            continue
        lab = labels.get(r["patient_id"])
        s = status(lab) if lab else None
        if s is None:
            unmatched += 1
            continue
        cases.append((r, lab, s))
    y = [int(c[2]) for c in cases]
    p = [float(c[0]["prob"]) for c in cases]
    out = stats(y, p, a.threshold, a.target)
    out["unmatched"] = unmatched
    out["failed"] = failed
    out["subgroups"] = {}
    for col in ["modalities_used"] + a.by:
        groups = {}
        for r, lab, s in cases:
            v = lab[col] if col in lab else r[col]
            groups.setdefault(v, ([], []))
            groups[v][0].append(int(s))
            groups[v][1].append(float(r["prob"]))
        name = "modalities" if col == "modalities_used" else col
        out["subgroups"][name] = {v: stats(gy, gp, a.threshold, a.target) for v, (gy, gp) in groups.items()}
    if a.compare:
        with open(a.compare, newline="") as f:
            other = {r["case_id"]: float(r["prob"]) for r in csv.DictReader(f) if not r["error"] and r["prob"]}
        yc, pa, pb = [], [], []
        for r, lab, s in cases:
            if r["case_id"] in other:
                yc.append(int(s))
                pa.append(float(r["prob"]))
                pb.append(other[r["case_id"]])
        z, pv, ci_a, ci_b, auc_a, auc_b, info = Delong_test(np.array(yc), np.array(pa), np.array(pb))
        out["comparison"] = {"n": len(yc), "auroc_a": float(auc_a), "auroc_b": float(auc_b),
                             "z": float(z), "p_value": float(pv), "method": info["method"],
                             "var_diff": float(info["var_diff"])}
    print(json.dumps(out))


if __name__ == "__main__":
    main()
