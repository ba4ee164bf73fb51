"""What a run is compared as: its experiment (data, model, training), its series (the arm and every
setting that tells its masks apart) and the series it is paired with (the random control, the node-level
peer of a weight-level series, the source of a structure-alone series)."""

from __future__ import annotations

from fastweedout.experiment import runs


def experiment_key(cfg: dict) -> str:
    return runs.config_hash({k: cfg.get(k) for k in ("data", "model", "training", "version")})[:8]


def _k(cfg: dict) -> str:
    k = cfg.get("pretrain_steps") or 0
    return f"/k{k}{'r' if cfg.get('rewind') else ''}" if k else ""


def _structure(cfg: dict) -> str:
    """Structure-alone runs (fastweedout.experiment.structure): fresh weights, shuffled nodes."""
    return ("/reinit" if cfg.get("reinit") else "") + ("/shuffled" if cfg.get("shuffle") else "")


def series_key(cfg: dict) -> str:
    return _series_key(cfg) + _structure(cfg)


def _series_key(cfg: dict) -> str:
    a, mode, gran = cfg["arm"], cfg.get("mode"), cfg.get("granularity", "node")
    if a == "dense":
        return "dense" + _k(cfg)
    if a == "weedout":
        s = cfg["search"]
        steps = f"/m{s['member_steps']}" if s.get("member_steps") else ""
        return (f"weedout/{mode}/{gran}/P{s['population']}xG{s['generations']}/{s['metric']}/{s['bn']}/"
                f"{s['strategy']}{steps}{_k(cfg)}")
    if a == "throughout":
        s, t = cfg["search"], cfg["throughout"]
        return f"throughout/{mode}/P{s['population']}/i{t['interval']}/ft{t['finetune_epochs']}/{s['metric']}"
    if a == "given":
        return f"given/{(cfg.get('mask_sha256') or '')[:8]}"
    return f"{a}/{mode}/{gran}{_k(cfg)}"


def _trains_from_parent(cfg: dict) -> bool:
    """Whether training starts from the step-K weights (not the initial ones, ``rewind``, nor fresh ones)."""
    return bool(cfg.get("pretrain_steps")) and not cfg.get("rewind") and not cfg.get("reinit")


def control_key(cfg: dict) -> str | None:
    """The random series trained the way this one is. A random mask is drawn from the seed alone, so the
    step-K parent reaches a random run only through the weights training starts from: a run that
    rewinds or re-initialises is controlled by the random run without pretraining
    (``config.make_run_config`` makes those the same run)."""
    if cfg["arm"] in ("dense", "random", "given"):
        return None
    k = _k(cfg) if _trains_from_parent(cfg) else ""  # the throughout arm never has pretrain_steps
    reinit = "/reinit" if cfg.get("reinit") else ""  # a shuffled mask's control is the plain random mask
    return f"random/{cfg.get('mode')}/{cfg.get('granularity', 'node')}{k}{reinit}"


def init_control_key(cfg: dict) -> str | None:
    """The control of the before-training metrics: the random series whose mask was scored on the same
    parent (the step-K weights, whatever training starts from afterwards)."""
    if control_key(cfg) is None or not cfg.get("pretrain_steps") or _trains_from_parent(cfg):
        return control_key(cfg)
    return f"random/{cfg.get('mode')}/{cfg.get('granularity', 'node')}{_k(dict(cfg, rewind=False))}"


def node_peer_key(cfg: dict) -> str | None:
    """The node-level series a weight-level one is compared with (same arm, search and sparsity)."""
    return series_key(dict(cfg, granularity="node")) if cfg.get("granularity") == "weight" else None


def source_key(cfg: dict) -> str | None:
    """A structure-alone series' source: the same arm with its own weights and nodes."""
    return series_key(dict(cfg, reinit=False, shuffle=False)) if _structure(cfg) else None


__all__ = ["control_key", "experiment_key", "init_control_key", "node_peer_key", "series_key", "source_key"]
