"""Registration reports: one JSON-ready dict per stack, and the log line that goes with it.

Motion is reported relative to the stack's scanner geometry (see :mod:`.rigid` for the transform
directions): ``translation_mm`` is the displacement of the stack's centre, ``rotation_deg`` the rotation
vector (axis times angle, degrees) about L, P, S.
"""

import logging

from ..stack import scanner_centre_mm
from ..transforms import describe_motion

log = logging.getLogger("MultiPlaneFusionLib")


def _transform_rows(stack):
    return [[float(v) for v in row] for row in stack.transform]


def stack_report(n, stack, initialisation, info, *, metric):
    """The report of stack ``n`` after registration: motion, the optimiser's ``info`` dict, the 4x4 transform."""
    report = {"index": n, "description": stack.description, "reference": False, "metric": metric,
              "initialisation": initialisation}
    report.update(describe_motion(stack.transform, scanner_centre_mm(stack)))
    report.update(info)
    report["transform"] = _transform_rows(stack)
    return report


def reference_report(n, stack):
    """The report entry of the reference stack (it is not moved)."""
    report = {"index": n, "description": stack.description, "reference": True, "initialisation": "reference",
              "iterations": 0, "accepted": True, "warning": None, "initial_metric": None, "final_metric": None}
    report.update(describe_motion(stack.transform, scanner_centre_mm(stack)))
    report["transform"] = _transform_rows(stack)
    return report


def log_report(report, target_name):
    """Log one stack's registration (INFO), and its warning (WARNING) or note (INFO) if any."""
    t = report["translation_mm"]

    def metric(v):
        return "n/a" if v is None else f"{v:.4f}"

    log.info(
        "registered '%s' to %s: translation (%.2f, %.2f, %.2f) mm, rotation %.2f deg, metric %s -> %s, "
        "%d iterations, %.1f s",
        report["description"], target_name, t[0], t[1], t[2], report["rotation_angle_deg"],
        metric(report["initial_metric"]), metric(report["final_metric"]), report["iterations"], report["seconds"],
    )
    if report["warning"]:
        log.warning("registration of '%s': %s", report["description"], report["warning"])
    elif report.get("note"):
        log.info("registration of '%s': %s", report["description"], report["note"])
