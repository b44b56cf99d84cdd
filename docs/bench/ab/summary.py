#!/usr/bin/env python3
"""Summarises ab.sh output: per case and variant, the before/after medians,
per-round after/before ratios, and the reset phases."""
import json, re, statistics as st, sys
rows = {}
for line in open(sys.argv[1], errors="replace"):
    m = re.search(r"AB-(before|after)-(\d+) BENCH-SAMPLE (\{.*\})", line)
    if not m:
        if "BENCH-FAIL" in line:
            print("FAILED:", line.strip())
        continue
    which, rnd, s = m.group(1), int(m.group(2)), json.loads(m.group(3))
    rows.setdefault((s["workload"], s["cpus"], s["variant"]), {}).setdefault(which, []).append((rnd, s))
def med(v):
    return st.median(v) if v else float("nan")
for (w, c, v), d in rows.items():
    b = {r: s for r, s in d.get("before", [])}
    a = {r: s for r, s in d.get("after", [])}
    bv = [s["value"] for s in b.values()]; av = [s["value"] for s in a.values()]
    per = [a[r]["value"] / b[r]["value"] for r in a if r in b and b[r]["value"] > 0]
    unit = next(iter(a.values() or b.values()))["unit"]
    print(f"{w}/{c} {v}: before median {med(bv):.1f} {unit} (n={len(bv)}, {min(bv):.1f}..{max(bv):.1f}), "
          f"after {med(av):.1f} (n={len(av)}, {min(av):.1f}..{max(av):.1f}); after/before {med(av)/med(bv):.2f}x, per round {min(per):.2f}..{max(per):.2f}")
    if w == "system-reset":
        for which, ss in (("before", b), ("after", a)):
            ph = {k: med([x for s in ss.values() for x in s["detail"]["phase_ms"][k]]) for k in ("to_decision", "to_stopped", "to_running")}
            print(f"    {which} phases (median over all resets): decision {ph['to_decision']:.1f} ms, stopped {ph['to_stopped']:.1f}, running {ph['to_running']:.1f}")
    if w == "bring-up":
        for which, ss in (("before", b), ("after", a)):
            cm = med([s["detail"]["cpu_on"]["call_us_median"] for s in ss.values()])
            sm = med([s["detail"]["cpu_on"]["start_us_median"] for s in ss.values()])
            print(f"    {which}: CPU_ON call median {cm:.0f} us, start latency median {sm:.0f} us (medians of the samples' medians)")
print()
print("vpsci / in-kernel within each binary (per round: the two variants ran back to back):")
cases = sorted({(w, c) for (w, c, v) in rows})
for w, c in cases:
    for which in ("before", "after"):
        vp = {r: s["value"] for r, s in rows.get((w, c, "vpsci"), {}).get(which, [])}
        ik = {r: s["value"] for r, s in rows.get((w, c, "in-kernel"), {}).get(which, [])}
        per = sorted(vp[r] / ik[r] for r in vp if r in ik)
        if per:
            print(f"  {w}/{c} {which}: median of medians {med(list(vp.values()))/med(list(ik.values())):.2f}x, per round {', '.join(f'{x:.2f}' for x in per)}")
