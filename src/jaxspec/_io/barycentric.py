"""The barycentric correction of an exposure's wavelengths (``HELIOCOR``), offline.

desispec's extraction, with ``--barycentric-correction``, extracts at the detector
wavelengths ``wave / HELIOCOR`` and labels the frame with ``wave`` (barycentric),
writing the factor as ``HELIOCOR``.  The factor is ``1 + v / c`` with ``v`` the
barycentric radial-velocity correction [km/s] of the pointing at mid-exposure, seen
from Kitt Peak.  astropy computes it; IERS tables are never downloaded (the ones
bundled with astropy are used, with a warning where they run out).
"""

from __future__ import annotations

import contextlib
from collections.abc import Mapping

__all__ = ["KPNO", "barycentric_factor", "pointing"]

#: Kitt Peak (Mayall telescope) as desispec places it: latitude, longitude [deg], height [m].
KPNO = (31.96403, -111.59989, 2097.0)

_RA_KEYS = ("TARGTRA", "SKYRA", "TELRA", "RA")
_DEC_KEYS = ("TARGTDEC", "SKYDEC", "TELDEC", "DEC")
_MJD_KEYS = ("MJD-OBS", "MJD")


def pointing(header: Mapping, where: str = "header") -> tuple[float, float, float]:
    """``(ra, dec, mjd_mid)`` [deg, deg, days] of an exposure header.

    The first key present of TARGTRA/SKYRA/TELRA/RA, TARGTDEC/SKYDEC/TELDEC/DEC and
    MJD-OBS/MJD (desispec's order); ``mjd_mid`` adds half of EXPTIME [s] (0 if absent).

    Raises:
        ValueError: a key is missing or not a number (the message names ``where``).
    """
    def first(keys):
        for k in keys:
            if k in header and header[k] is not None:
                try:
                    return float(header[k])
                except (TypeError, ValueError):
                    raise ValueError(f"{where}: {k} = {header[k]!r} is not a number") from None
        raise ValueError(f"{where}: none of {', '.join(keys)} is set; --barycentric-correction needs the "
                         "pointing (RA, DEC) and the time (MJD-OBS) of the exposure")

    ra, dec, mjd = first(_RA_KEYS), first(_DEC_KEYS), first(_MJD_KEYS)
    exptime = float(header.get("EXPTIME", 0.0) or 0.0)
    return ra, dec, mjd + exptime / 2.0 / 86400.0


@contextlib.contextmanager
def _offline_iers():
    """astropy's IERS tables as bundled, never downloaded (restored afterwards)."""
    from astropy.utils import iers

    with iers.conf.set_temp("auto_download", False), iers.conf.set_temp("auto_max_age", None), \
            iers.conf.set_temp("iers_degraded_accuracy", "warn"):
        yield


def barycentric_factor(header: Mapping, where: str = "header") -> float:
    """``1 + v / c``: the multiplicative barycentric correction of the exposure in ``header``.

    Args:
        header: the preproc (or fibermap) header: pointing and time, see :func:`pointing`.
        where: how ``header`` is named in messages.
    """
    import astropy.constants
    import astropy.units as u
    from astropy.coordinates import EarthLocation, SkyCoord
    from astropy.time import Time

    ra, dec, mjd = pointing(header, where)
    lat, lon, height = KPNO
    with _offline_iers():
        site = EarthLocation.from_geodetic(lat=lat * u.deg, lon=lon * u.deg, height=height * u.m)
        sky = SkyCoord(ra=ra * u.deg, dec=dec * u.deg, frame="icrs")
        v = sky.radial_velocity_correction("barycentric", obstime=Time(mjd, format="mjd"), location=site)
        v_kms = float(v.to(u.km / u.s).value)
    return 1.0 + v_kms / float(astropy.constants.c.to(u.km / u.s).value)
