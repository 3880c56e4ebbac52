"""The driver's side of a run's evidence: provenance (from a worker, plus the dataset fingerprint over the part
fingerprints, in part order) and the worst of the workers' self-checks, written into the metadata at commit.

Memory is flat in the number of parts: a running hash and one worst-so-far check. No Ray here.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable, Iterable, Optional

from ..provenance import DatasetDigest
from ..selfcheck import check_mode, worst


class RunEvidence:
    """Collects, during one ``extract`` call, what goes into ``metadata["provenance"]`` and ``["self_check"]``."""

    def __init__(self, self_check: str) -> None:
        self.mode = check_mode(self_check)
        self.digest = DatasetDigest()
        self.check: Optional[dict[str, Any]] = None

    @staticmethod
    def provenance(worker_info: Optional[dict[str, Any]]) -> Optional[dict[str, Any]]:
        """The provenance a worker reported for its loaded model (``dataset_fingerprint`` is set at commit)."""
        prov = (worker_info or {}).get("provenance")
        return None if prov is None else {**prov, "dataset_fingerprint": None}

    def part(self, part: Any) -> None:
        """Every planned part, in part order (committed ones included): its fingerprint joins the dataset's."""
        self.digest.add(getattr(part, "fingerprint", None))

    def result(self, res: dict[str, Any]) -> None:
        """A worker's answer for one part; keeps the worst self-check seen."""
        if res.get("self_check"):
            self.check = worst([self.check, res["self_check"]])

    def add_stored(self, done: Iterable[int], read_record: Callable[[int], dict[str, Any]],
                   threads: int = 16) -> None:
        """On resume: the self-checks in the records of parts committed by earlier attempts."""
        ids = sorted(done)
        if not ids or self.mode == "off":
            return
        with ThreadPoolExecutor(max_workers=min(threads, len(ids))) as pool:
            for rec in pool.map(read_record, ids):
                if isinstance(rec, dict) and rec.get("self_check"):
                    self.check = worst([self.check, rec["self_check"]])

    def apply(self, metadata: dict[str, Any]) -> None:
        """Write the dataset fingerprint and the worst self-check into the run's metadata (before its commit)."""
        if isinstance(metadata.get("provenance"), dict):
            metadata["provenance"]["dataset_fingerprint"] = self.digest.value()
        metadata["self_check"] = self.check if self.mode != "off" else None
