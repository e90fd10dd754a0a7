"""After the main job: where the report, the MLflow UI and the deployed files are (run by `make run`)."""

from __future__ import annotations

import json
import sys
from pathlib import Path


def main(seconds: str = "") -> None:
    report = Path("artifacts/reports/heldout")
    gate = json.loads(Path("artifacts/registry/gate.json").read_text())
    deployed = json.loads(Path("artifacts/registry/deployed.json").read_text())
    registered = json.loads(Path("artifacts/registry/registered.json").read_text())
    print("\n" + "=" * 100)
    print(f"The chain ran on the embedded default (the TOY world and its toy base generator)"
          f"{f' in {seconds} s' if seconds else ''}.")
    base_gate = Path("artifacts/toybase/gate.json")
    if base_gate.is_file():
        gate_ = json.loads(base_gate.read_text())
        m = gate_["measured"]
        verdict = "passed" if gate_["passed"] else "REFUSED (uninformative base: " + "; ".join(gate_["failures"]) + ")"
        print(f"Toy base gate (held-out photos of its cast): 2-face rate {m['two_face_rate']}, ID-Sim {m['id_sim']}, "
              f"ID-Conf {m['id_conf']}: {verdict}")
    print(f"\nEvaluation report: {report / 'report.md'} (metrics.json, grids/, images/; `dvc metrics show`)")
    lines = (report / "report.md").read_text().splitlines()
    table = [line for line in lines if line.startswith("|")][:11]
    print("\n".join("  " + line for line in table))
    print(f"\nRegistry: model {registered['model']} version {registered['version']} (MLflow run "
          f"{registered['run_id']}); gate {'PASSED' if gate['passed'] else 'refused'}"
          + ("" if gate["passed"] else f" ({'; '.join(v for v in gate['rules'].values() if v.startswith('FAIL'))})"))
    print("MLflow UI:  .venv/bin/mlflow ui --backend-store-uri sqlite:///artifacts/mlflow/mlflow.db "
          "--host 127.0.0.1 --port 5000   # then open http://127.0.0.1:5000")
    if deployed.get("version") is None:
        print(f"Deployed:   nothing ({deployed.get('reason', 'no approved champion')})")
        return
    folder = Path(deployed["location"]) / deployed["model"]
    print(f"Deployed:   version {deployed['version']} in {folder}/ ({folder / 'current.json'} is the pointer)")
    for path in sorted((folder / deployed["version"]).iterdir()):
        print(f"  {path.name:40s} {path.stat().st_size:>10d} bytes")


if __name__ == "__main__":
    main(*sys.argv[1:])
