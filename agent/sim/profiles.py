"""Profile inventory of the local SM-DP+: hands out ICCID/IMSI pairs for reservations.

A real SM-DP+ holds a stock of pre-generated profiles per operator; the test bed
manufactures them on demand instead. Each inventory has a random 4-digit batch
number (persisted with the server state) so two server instances started from
scratch do not hand the same ICCID to one card, which an eUICC would refuse as a
duplicate (SGP.22 ProfileInstallationResult iccidAlreadyExists).
"""
from __future__ import annotations

import secrets
import threading
from dataclasses import dataclass

from ..ids import make_iccid

# ITU-T E.118: "89" telecom + "999" (no real issuer) keeps test ICCIDs visibly fake.
ICCID_PREFIX = "89999"
# MCC 001 / MNC 01 is the ITU test network (3GPP TS 23.003), never a real operator.
IMSI_PREFIX = "00101"

SERVICE_PROVIDER = "esim-agent test SM-DP+"


@dataclass(frozen=True)
class ProfileSpec:
    """What the SM-DP+ needs to build and describe one profile."""

    iccid: str
    imsi: str
    service_provider_name: str
    profile_name: str
    profile_class: str = "operational"  # SGP.22 ProfileClass: test | provisioning | operational


class ProfileInventory:
    """Sequential allocator over a batch; ``state`` is the caller's persisted dict."""

    def __init__(self, state: dict | None = None):
        self._lock = threading.Lock()
        self.state = state if state is not None else {}
        if not isinstance(self.state.get("batch"), int) or not 0 <= self.state["batch"] <= 9999:
            self.state["batch"] = secrets.randbelow(10000)
        if not isinstance(self.state.get("next"), int) or self.state["next"] < 1:
            self.state["next"] = 1

    def allocate(self) -> ProfileSpec:
        with self._lock:
            serial = self.state["next"]
            self.state["next"] = serial + 1
            batch = self.state["batch"]
        return spec_for(batch, serial)


def spec_for(batch: int, serial: int) -> ProfileSpec:
    # 19-digit ICCID: 89999 + batch(4) + serial(9) + Luhn; 15-digit IMSI: 00101 + batch(4) + serial(6).
    iccid = make_iccid(f"{ICCID_PREFIX}{batch:04d}", serial, 19)
    imsi = f"{IMSI_PREFIX}{batch:04d}{serial % 1_000_000:06d}"
    return ProfileSpec(
        iccid=iccid,
        imsi=imsi,
        service_provider_name=SERVICE_PROVIDER,
        profile_name=profile_name(iccid),
    )


def profile_name(iccid: str) -> str:
    """Human name shown by the LPA (StoreMetadata profileName) and in the UPP header."""
    return f"Test profile {iccid[-5:-1]}"
