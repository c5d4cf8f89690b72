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
    """The report of stack ``n`` after registration: motion, the optimiser's ``info`` dict, the 4x4 transform.

    ``initialisation`` names the start the result came from; " + rotation search" is appended when the
    large-motion search found the result. ``info["search"]`` (None when the search did not run) says why it
    ran, how many candidates it scored and refined, the winning turn (degrees about L, P, S) and whether it
    beat the local result; ``info["motion"]`` classes the result's motion ('small', 'large', 'implausible')
    and ``info["gain"]`` is its relative metric improvement, which the guards judged."""
    search = info.get("search")
    if search and search.get("won"):
        initialisation += " + rotation search"
    report = {"index": n, "description": stack.description, "reference": False, "metric": metric,
              "initialisation": initialisation}
    report.update(describe_motion(stack.transform, scanner_centre_mm(stack)))
    report.update(info)
    report["transform"] = _transform_rows(stack)
    return report


def reference_report(n, stack):
    """The report entry of the reference stack (it is not moved)."""
    report = {"index": n, "description": stack.description, "reference": True, "initialisation": "reference",
              "iterations": 0, "accepted": True, "warning": None, "initial_metric": None, "final_metric": None,
              "motion": None, "gain": None, "search": None, "decision": "reference: not moved"}
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
    search = report.get("search")
    if search:
        turn = "none" if search.get("turn_deg") is None else "({:.0f}, {:.0f}, {:.0f}) deg".format(*search["turn_deg"])
        log.info("registration of '%s': large-motion search (%s): %d candidates scored, %d refined, best turn %s; "
                 "%s", report["description"], search["reason"], search["candidates"], search["refined"], turn,
                 "its result beat the local one" if search.get("won") else "the local result was better, kept it")
    if report["warning"]:
        log.warning("registration of '%s': %s", report["description"], report["warning"])
    elif report.get("note") or report.get("decision"):
        log.info("registration of '%s': %s", report["description"], report.get("note") or report["decision"])
