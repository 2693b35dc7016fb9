"""The `medfed` command: one subcommand per role, Hydra overrides after it.

medfed demo                                   # local 3-hospital consortium, DP, MLflow
medfed run federation.num_sites=5 privacy.noise_multiplier=1.1 rounds=3
medfed generate --output consortium --sites 3
medfed site check --data consortium/site-1
medfed site prepare --source consortium/site-1 --output site-state/site-1/prepared
medfed site prepare --source dicomweb://localhost:8042/dicom-web --output DIR --modality CT
medfed site prepare --source dimse://ORTHANC@localhost:4242 --output DIR --study-date 2024-
medfed site policy --state site-state/site-1 --max-epsilon 8 --delta 1e-5
medfed site policy --state site-state/site-1 --require-plan-approval --min-noise-multiplier 1.0
medfed site plans list --state site-state/site-1
medfed site plans add --state site-state/site-1 rounds=5 privacy.noise_multiplier=1.1
medfed site plans show PLAN --state site-state/site-1
medfed site plans approve PLAN --by "Dr. Name" --state site-state/site-1
medfed site plans revoke PLAN --by "Dr. Name" --reason "..." --state site-state/site-1
medfed audit verify site-state/*/ledger.jsonl --keys site-state
medfed audit epsilon --sample-rate 0.04 --noise-multiplier 1.5 --steps 2250 --delta 1e-5
medfed audit report site-state/*/ledger.jsonl --keys site-state --output audit
medfed config privacy=none
medfed provision consortium.yaml --output kits        # CA, SuperLink cert, coordinator kit
medfed site init --name site-4 --kit site-kit          # at the site: own keys, enrolment
medfed provision consortium.yaml --output kits --enrol enrolment.json --fingerprint FP
medfed site join --kit site-kit --bundle kits/sites/site-4
medfed site apps approve DIGEST --by "Dr. Name" --state site-kit/state
medfed audit keys --kit kits/coordinator
medfed provision consortium.yaml --output kits --revoke site-2
medfed server start --kit kits/coordinator            # SuperLink: TLS + node auth
medfed site start --kit site-kit --data /data/dicom
medfed run federation=deploy federation.kit=kits/coordinator rounds=10
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path
from typing import Any

__all__ = ["main"]


def _cmd_config(args: argparse.Namespace) -> int:
    from omegaconf import OmegaConf

    from federation.compose import compose_config

    print(OmegaConf.to_yaml(OmegaConf.structured(compose_config(args.overrides))), end="")
    return 0


def _cmd_generate(args: argparse.Namespace) -> int:
    from federation.compose import compose_config
    from federation.dicom.synth import generate_consortium

    cfg = compose_config(args.overrides)
    names = [f"site-{i + 1}" for i in range(args.sites)] if args.sites else cfg.federation.names()
    generate_consortium(
        Path(args.output),
        site_names=names,
        patients_per_site=cfg.data.patients_per_site,
        slices=cfg.data.slices,
        seed=cfg.seed,
        progress=print,
    )
    print(f"wrote {len(names)} sites under {Path(args.output).resolve()}")
    return 0


def _cmd_run(args: argparse.Namespace) -> int:
    import dataclasses
    import datetime as dt

    from federation.compose import compose_config
    from federation.config import resolve_path
    from medfed.launch import run_simulation
    from server.report import run_summary

    if getattr(args, "resume", None):
        from server.checkpoint import resume_config

        cfg = resume_config(args.resume, args.overrides)
    else:
        cfg = compose_config(args.overrides)
    if args.command == "demo" and not any(
        o.startswith("federation.site_state_root=") for o in args.overrides
    ):
        # A demo is self-contained: its simulated hospitals start with fresh budgets.
        # `medfed run` keeps site state (and spent budget) across runs.
        name = cfg.run_name or dt.datetime.now().strftime("demo-%Y%m%d-%H%M%S")
        state = resolve_path(cfg.output_dir) / name / "site-state"
        cfg = dataclasses.replace(
            cfg,
            run_name=name,
            federation=dataclasses.replace(cfg.federation, site_state_root=str(state)),
        )
    if cfg.federation.engine == "deployment":
        return _run_deployment(cfg)
    result = run_simulation(cfg)
    print()
    print(run_summary(result, cfg))
    return 0


def _cmd_evaluate(args: argparse.Namespace) -> int:
    import dataclasses
    import datetime as dt

    from federation.compose import check_config, compose_config
    from federation.config import resolve_path
    from federation.initweights import load_initial_weights
    from federation.tracking import default_tracking_uri
    from medfed.launch import run_simulation
    from server.loop import RunHistory
    from server.report import format_evaluation

    cfg = compose_config(args.overrides)
    init = load_initial_weights(
        args.model,
        tracking_uri=cfg.tracking.uri or default_tracking_uri(),
        output_dir=resolve_path(cfg.output_dir),
    )
    # A medfed package brings its task and model; other weights use the configured ones.
    task, model = (init.package.task, init.package.model) if init.package else (cfg.task, cfg.model)
    cfg = check_config(
        dataclasses.replace(
            cfg,
            task=task,
            model=dataclasses.replace(model, init=args.model, freeze=[]),
            rounds=0,
            evaluation=dataclasses.replace(cfg.evaluation, all_data=args.all_data),
            run_name=cfg.run_name or dt.datetime.now().strftime("evaluate-%Y%m%d-%H%M%S"),
        )
    )
    if cfg.federation.engine == "deployment":
        _run_deployment(cfg)
        history = RunHistory.load(resolve_path(cfg.output_dir) / str(cfg.run_name) / "history.json")
    else:
        history = run_simulation(cfg).history
    print()
    print(format_evaluation(history, init.source))
    return 0


def _run_deployment(cfg: Any) -> int:
    import dataclasses
    import datetime as dt

    from federation.config import resolve_path
    from server.deploy import run_deployment
    from server.loop import RunHistory
    from server.report import format_table

    name = cfg.run_name or dt.datetime.now().strftime("medfed-%Y%m%d-%H%M%S")
    cfg = dataclasses.replace(cfg, run_name=name)
    outcome = run_deployment(cfg, progress=print)
    out = resolve_path(cfg.output_dir) / name
    history = RunHistory.load(out / "history.json")
    print()
    print(format_table(history))
    print(f"Flower run {outcome.run_id} finished in {outcome.seconds:.0f} s")
    print(f"Model, history, plot and ledger copies: {out}")
    uri = cfg.tracking.uri or f"sqlite:///{Path('mlflow.db').resolve()}"
    print(f"MLflow: mlflow ui --backend-store-uri {uri}  (run name {name})")
    return 0


def _cmd_provision(args: argparse.Namespace) -> int:
    from federation.provision import legacy_private_keys, provision, revoke_site
    from server.deploy import sync_running

    description, output = Path(args.description), Path(args.output)
    coordinator = output / "coordinator"
    if args.revoke:
        revoke_site(coordinator, args.revoke, description=description)
        print(f"site {args.revoke} revoked in {coordinator.resolve()} and {description}")
        if sync_running(coordinator):
            print("unregistered from the running SuperLink: it can no longer connect")
        else:
            print("no SuperLink running here: it unregisters the site at its next start")
        return 0
    if len(args.fingerprint) != len(args.enrol):
        raise ValueError(
            f"{len(args.enrol)} --enrol file(s) but {len(args.fingerprint)} --fingerprint(s): "
            "give each enrolment the fingerprint its site read to you, in the same order"
        )
    enrol = [(Path(f), fp) for f, fp in zip(args.enrol, args.fingerprint, strict=True)]
    kit = provision(description, output, add_sites=args.add_site, enrol=enrol)
    for site, entry in kit.manifest()["sites"].items():
        key = f" (SuperNode key {entry['auth_key']})" if entry.get("auth_key") else ""
        print(f"{site}: {entry['status']}{key}")
    if enrol and sync_running(coordinator):
        print("registered with the running SuperLink")
    print(f"coordinator kit: {kit.root}  (start: medfed server start --kit {kit.root})")
    print(f"enrolled sites' folders: {output.resolve() / 'sites'}/<site>  (send each to its site)")
    for path in legacy_private_keys(output):
        print(
            f"warning: {path} is a site private key made here by an older medfed; the site "
            "re-keys with `medfed site init --rekey` and is enrolled again, which removes it",
            file=sys.stderr,
        )
    return 0


def _cmd_server_start(args: argparse.Namespace) -> int:
    import signal

    from server.deploy import SuperLink

    link = SuperLink.start(
        Path(args.kit),
        host=args.host,
        port=args.port,
        control_port=args.control_port,
        database=Path(args.database) if args.database else None,
    )
    gate = link.gate.address if link.gate else "?"
    print(
        f"SuperLink running (pid {link.process.pid}) on {link.address} (this host only); the "
        f"sites reach its Fleet API alone, through the gate on {gate}; log: {link.log_file}; "
        "Ctrl-C stops it"
    )

    def stop(signum: int, _frame: Any) -> None:
        link.stop()
        sys.exit(0)

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    import time

    watched = {"SuperLink": link.process}
    if link.gate is not None:
        watched["Fleet gate (nginx)"] = link.gate.process
    while all(proc.poll() is None for proc in watched.values()):
        time.sleep(1.0)
    gone = next(name for name, proc in watched.items() if proc.poll() is not None)
    link.stop()
    print(
        f"the {gone} exited; stopped the coordinator; see {link.log_file.parent}", file=sys.stderr
    )
    return 1


def _cmd_site_start(args: argparse.Namespace) -> int:
    from client.supernode import SiteAgent, run_site

    agent = SiteAgent.from_kit(
        Path(args.kit),
        data=Path(args.data) if args.data else Path(args.kit) / "data",
        state=Path(args.state) if args.state else None,
        superlink=args.superlink,
        poll_interval=args.poll_interval,
    )
    return run_site(agent)


def _cmd_site_init(args: argparse.Namespace) -> int:
    from federation.enrolment import ENROLMENT_FILE, init_site_keys

    kit = Path(args.kit)
    enrolment = init_site_keys(kit, args.name, rekey=args.rekey)
    print(f"site {enrolment.site}: keys made in {kit.resolve()} (private keys stay here, 0600)")
    if enrolment.replaces:
        print(f"retired keys: {enrolment.replaces} (public halves kept in {kit / 'retired'})")
    print(f"send {kit.resolve() / ENROLMENT_FILE} to the coordinator (it holds public keys only)")
    print(f"and read them this fingerprint by another channel: {enrolment.fingerprint}")
    return 0


def _cmd_site_join(args: argparse.Namespace) -> int:
    from federation.provision import join_site

    kit = join_site(Path(args.kit), Path(args.bundle))
    info = kit.info()
    print(f"site {info['site']} joined {info['consortium']}; SuperLink {info['superlink']}")
    print(f"start it with: medfed site start --kit {kit.root} --data DIR")
    return 0


def _app_gate(args: argparse.Namespace) -> Any:
    from client.apptrust import AppGate

    return AppGate(*_site_state(args))


def _cmd_apps_list(args: argparse.Namespace) -> int:
    gate = _app_gate(args)
    for digest, origin in gate.trusted().items():
        print(f"trusted  {digest}  {origin}")
    for entry in gate.refusals():
        d = entry["details"]
        print(f"refused  {d['app']}  run {d.get('run')} at {entry['time']} (FAB {d.get('fab')})")
    return 0


def _cmd_apps_approve(args: argparse.Namespace) -> int:
    entry = _app_gate(args).approve(args.app, by=args.by, note=args.note)
    print(f"approved app {entry['details']['app']} by {entry['by']} (audit entry {entry['index']})")
    return 0


def _cmd_apps_revoke(args: argparse.Namespace) -> int:
    entry = _app_gate(args).revoke(args.app, by=args.by, reason=args.reason)
    print(f"revoked app {entry['details']['app']} by {entry['by']} (audit entry {entry['index']})")
    return 0


def _cmd_audit_keys(args: argparse.Namespace) -> int:
    from federation.audit import key_bindings

    rows, problems = key_bindings(Path(args.kit))
    for row in rows:
        print(
            f"{row['site']}: {row['status']}; ledger key {row['ledger_key_id']}, SuperNode key "
            f"{row['auth_key']}; enrolment {row['fingerprint']} ({row['enrolled']}): "
            f"{row['origin']}"
        )
    for problem in problems:
        print(f"FAIL {problem}", file=sys.stderr)
    return 1 if problems else 0


def _cmd_site_check(args: argparse.Namespace) -> int:
    import tempfile

    from federation.dicom.prepare import labelled_volumes

    path = Path(args.data)
    if not path.is_dir():
        print(f"error: data folder {path} does not exist or is not a folder", file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory(prefix="medfed-check-") as cache:
        volumes, report = labelled_volumes(path, Path(cache))
    problems = report.problems
    for problem in problems:
        print(f"not used: {problem.path}: {problem.reason}")
    vendors = sorted({v.manufacturer for v in volumes})
    print(
        f"{path}: {len(volumes)} labelled series usable, {len(problems)} not used; "
        f"vendors: {', '.join(vendors) or '-'}"
    )
    return 0 if volumes else 1


_GOVERNANCE_FLAGS = (
    "require_plan_approval",
    "allowed_tasks",
    "max_rounds",
    "min_dataset_size",
    "min_noise_multiplier",
    "max_epsilon_per_run",
    "allowed_accountants",
    "require_evaluation_approval",
    "min_eval_examples",
    "allow_model_sharing",
)


def _update_governance(args: argparse.Namespace, path: Path) -> bool:
    """Write the governance limits given on the command line; True when any was."""
    from client.state import update_governance

    given = {n: getattr(args, n) for n in _GOVERNANCE_FLAGS if getattr(args, n) is not None}
    if not given:
        return False
    update_governance(path, given)
    return True


def _cmd_site_prepare(args: argparse.Namespace) -> int:
    from client.prepare import DataPolicy
    from federation.dicom.sources import SourceQuery, prepare_source

    policy = DataPolicy.load(Path(args.state)) if args.state else DataPolicy()
    options = dataclasses.replace(
        policy.options(progress=sys.stderr.isatty() and not args.quiet),
        labels_csv=Path(args.labels_csv) if args.labels_csv else None,
        target_spacing=tuple(args.spacing) if args.spacing else None,
        require_deidentified=args.require_deidentified or policy.require_deidentified,
    )
    query = SourceQuery(
        modality=args.modality,
        study_date=args.study_date,
        series_description=args.series_description,
    )
    output = Path(args.output)
    report = prepare_source(args.source, output, options=options, query=query)
    report.write(output)
    print(report.summary())
    print(f"wrote {output / 'manifest.json'} and {output / 'quarantine.json'}")
    return 0


def _load_model(args: argparse.Namespace) -> Any:
    from federation.modelpack import load_model
    from federation.tracking import default_tracking_uri

    return load_model(
        args.model,
        tracking_uri=args.tracking_uri or default_tracking_uri(),
        output_dir=Path(args.runs),
    )


def _cmd_model_export(args: argparse.Namespace) -> int:
    package = _load_model(args)
    path = package.save(Path(args.output))
    print(
        f"wrote {package.card.title} (run {package.card.run}, task {package.task.name}) to {path}"
    )
    return 0


def _cmd_site_predict(args: argparse.Namespace) -> int:
    import getpass

    from client.predict import STAGES, predict, record_use
    from client.state import SiteState
    from federation.dicom.sources import SourceQuery

    package = _load_model(args)
    query = SourceQuery(
        modality=args.modality,
        study_date=args.study_date,
        series_description=args.series_description,
    )
    state = Path(args.state) if args.state else None
    output = Path(args.output)
    report = predict(
        package,
        args.source,
        output,
        store_to=args.store_to,
        state_dir=state,
        query=query,
        nifti=args.nifti,
    )
    if state is not None:
        record_use(
            SiteState(*_site_state(args)).plans.audit,
            package.card,
            report,
            by=args.by or getpass.getuser(),
            stored_to=args.store_to,
        )
    total = sum(report.seconds.values()) or 1.0
    shares = ", ".join(f"{s} {report.seconds[s] / total:.0%}" for s in STAGES)
    print(
        f"{package.card.title}: {len(report.results)} series -> "
        f"{', '.join(sorted({r.kind for r in report.results})) or 'no results'}"
        f"{' (stored to ' + args.store_to + ')' if args.store_to else ''}; "
        f"{len(report.problems)} files quarantined (see {output / 'quarantine.json'})"
    )
    print(f"time {total:.1f} s: {shares}; results in {output / 'predictions.json'}")
    return 0


def _cmd_site_data_policy(args: argparse.Namespace) -> int:
    from client.prepare import DataPolicy

    state = Path(args.state)
    policy = DataPolicy.load(state)
    changes: dict[str, Any] = {k: v for k in ("on_phi", "private_tags") if (v := getattr(args, k))}
    if args.require_deidentified is not None:
        changes["require_deidentified"] = args.require_deidentified == "yes"
    if changes:
        policy = dataclasses.replace(policy, **changes)
        print(f"wrote {policy.save(state)}")
    print(
        f"require de-identified data: {'yes' if policy.require_deidentified else 'no'}; "
        f"a file that is not: {policy.on_phi}; private attributes: {policy.private_tags}"
    )
    return 0


def _cmd_site_deidentify(args: argparse.Namespace) -> int:
    from client.deidentify import deidentify_source
    from federation.dicom.deidentify import parse_profile
    from federation.dicom.sources import SourceQuery

    report = deidentify_source(
        args.source,
        Path(args.output),
        state_dir=Path(args.state),
        options=parse_profile(args.profile),
        query=SourceQuery(modality=args.modality, study_date=args.study_date),
        progress=sys.stderr.isatty() and not args.quiet,
    )
    print(report.summary())
    print(f"wrote {args.output}; the pseudonym map stays encrypted in {args.state}")
    return 0


def _cmd_site_reidentify(args: argparse.Namespace) -> int:
    from client.deidentify import PseudonymMap

    found = PseudonymMap(Path(args.state)).lookup(args.pseudonym)
    for entry in found:
        print(f"{entry['kind']}: {entry['original']}")
    if not found:
        print(f"{args.pseudonym}: not a pseudonym this site made", file=sys.stderr)
    return 0 if found else 1


def _cmd_site_policy(args: argparse.Namespace) -> int:
    from client.state import SitePolicy, SiteState

    state = SiteState(Path(args.state), Path(args.state).name)
    if args.max_epsilon is not None:
        SitePolicy(max_epsilon=args.max_epsilon, delta=args.delta).save(state.policy_path)
        print(f"wrote {state.policy_path}")
    if _update_governance(args, state.policy_path):
        print(f"wrote governance limits to {state.policy_path}")
    policy = state.policy()
    print(f"budget: epsilon {policy.max_epsilon:g} per dataset at delta {policy.delta:g}")
    limits = state.governance().to_dict()
    print("governance: " + ", ".join(f"{k}={v}" for k, v in limits.items()))
    for dataset, (spent, rounds) in state.spent().items():
        print(
            f"{dataset}: spent {spent:.3f} of {policy.budget_for(dataset):g} over {rounds} rounds"
        )
    return 0


def _site_state(args: argparse.Namespace) -> tuple[Path, str]:
    """The site's state folder and name (from the kit it sits in, else the folder's name)."""
    from client.state import site_name

    root = Path(args.state)
    if not root.is_dir():
        raise ValueError(f"site state folder {root} does not exist")
    return root, site_name(root)


def _plans(args: argparse.Namespace) -> Any:
    from client.state import SiteState

    return SiteState(*_site_state(args)).plans


def _cmd_plans_list(args: argparse.Namespace) -> int:
    plans = _plans(args)
    rows = plans.statuses()
    if not rows:
        print(f"no training plans requested or approved at {args.state}")
        return 0
    for plan, row in rows.items():
        decided = f" by {row['by']} at {row['time']}" if row["by"] else ""
        runs = ", ".join(r for r in row["runs"] if r) or "-"
        print(f"{plan}  {row['status']:<8}{decided}  runs: {runs}")
    return 0


def _cmd_plans_add(args: argparse.Namespace) -> int:
    """Register the plan a run with these overrides will send, for review ahead of it."""
    from federation.compose import compose_config
    from server.loop import site_config

    cfg = compose_config(args.overrides)
    flat: dict[str, Any] = dict(site_config(cfg, ""))
    plan = _plans(args).request(flat, run=cfg.run_name or "", by="medfed site plans add")
    print(f"plan {plan} is pending review at {args.state}")
    return 0


def _cmd_plans_show(args: argparse.Namespace) -> int:
    from client.governance import plan_summary

    plans = _plans(args)
    plan = plans.resolve(args.plan)
    print("\n".join(plan_summary(plans.document(plan))))
    print(f"  status: {plans.status(plan)}")
    previous = plans.previously_approved(plan)
    if previous is None:
        print("no other plan was approved at this site: nothing to compare with")
        return 0
    changes = plans.diff(previous, plan)
    print(f"changes from the previously approved plan {previous}:")
    print("\n".join(f"  {line}" for line in changes) or "  none")
    return 0


def _cmd_plans_approve(args: argparse.Namespace) -> int:
    plans = _plans(args)
    plan = plans.resolve(args.plan)
    entry = plans.approve(plan, by=args.by, note=args.note)
    print(
        f"approved plan {plan} by {entry['by']} at {entry['time']} (audit entry {entry['index']})"
    )
    return 0


def _cmd_plans_revoke(args: argparse.Namespace) -> int:
    plans = _plans(args)
    plan = plans.resolve(args.plan)
    entry = plans.revoke(plan, by=args.by, reason=args.reason)
    print(f"revoked plan {plan} by {entry['by']} at {entry['time']}", end="")
    print(f" (audit entry {entry['index']})")
    return 0


def _audits(args: argparse.Namespace) -> list[Any]:
    from federation.audit import audit_ledgers, load_keys

    keys = load_keys([Path(k) for k in args.keys])
    return audit_ledgers([Path(p) for p in args.ledgers], keys)


def _cmd_audit_verify(args: argparse.Namespace) -> int:
    audits = _audits(args)
    for audit in audits:
        if audit.ok:
            spend = ", ".join(
                f"{s['site']}/{s['dataset']}: epsilon {s['epsilon']:.4f} (delta {s['delta']:g})"
                for s in audit.summary()["spend"]
            )
            print(f"OK {audit.path}: {len(audit.entries)} entries verified; {spend}")
        else:
            for problem in audit.problems:
                print(f"FAIL {problem}", file=sys.stderr)
    return 0 if all(a.ok for a in audits) else 1


def _cmd_audit_epsilon(args: argparse.Namespace) -> int:
    from federation.privacy import MechanismStep, PrivacyHistory

    history = PrivacyHistory([MechanismStep(args.noise_multiplier, args.sample_rate, args.steps)])
    print(
        f"subsampled Gaussian: q={args.sample_rate}, sigma={args.noise_multiplier}, "
        f"{args.steps} steps, delta={args.delta}, accountant={args.accountant}"
    )
    print(repr(history.epsilon(delta=args.delta, accountant=args.accountant)))
    return 0


def _cmd_audit_report(args: argparse.Namespace) -> int:
    from federation.audit import write_report

    audits = _audits(args)
    html_path, json_path = write_report(audits, Path(args.output))
    print(f"wrote {html_path} and {json_path}")
    bad = [a.path for a in audits if not a.ok]
    if bad:
        print(f"NOT verified: {', '.join(bad)}", file=sys.stderr)
    return 1 if bad else 0


def _decision_parsers(
    group: Any,
    target: str,
    target_help: str,
    *,
    approve: tuple[str, Any],
    revoke: tuple[str, Any],
) -> None:
    """`approve` and `revoke` subcommands of a site decision recorded in its audit log."""
    for name, (help_text, func), extra, extra_help in (
        ("approve", approve, "--note", "a note kept with the approval"),
        ("revoke", revoke, "--reason", "why the approval is withdrawn"),
    ):
        p = group.add_parser(name, help=help_text)
        p.add_argument("--state", required=True, help="the site's state folder")
        p.add_argument(target, help=target_help)
        p.add_argument("--by", required=True, help="who decides (recorded in the audit log)")
        p.add_argument(extra, default="", help=extra_help)
        p.set_defaults(func=func)


def _with_overrides(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    p.add_argument(
        "overrides", nargs="*", help="Hydra overrides, e.g. privacy.noise_multiplier=1.1"
    )
    return p


def _run_parsers(sub: Any) -> None:
    """demo, run, config, generate: runs and their configuration."""
    _with_overrides(
        sub.add_parser("demo", help="run the local consortium demo on embedded defaults")
    ).set_defaults(func=_cmd_run)
    run = _with_overrides(sub.add_parser("run", help="run a federated training (coordinator)"))
    run.add_argument(
        "--resume",
        metavar="RUN",
        help="continue a run whose coordinator stopped (run name or MLflow run id), from "
        "its last completed round; only output_dir= and tracking.uri= may be given",
    )
    run.set_defaults(func=_cmd_run)
    evaluate = _with_overrides(
        sub.add_parser(
            "evaluate",
            help="evaluate a model at every site: metrics per site, no training, no budget",
        )
    )
    evaluate.add_argument(
        "--model",
        required=True,
        help="models:/NAME/VERSION, models:/NAME@ALIAS, a run name, a file or a MONAI bundle",
    )
    evaluate.add_argument(
        "--all-data",
        action="store_true",
        help="evaluate on all of each site's labelled data, not only its held-out patients",
    )
    evaluate.set_defaults(func=_cmd_evaluate)
    _with_overrides(sub.add_parser("config", help="print the resolved configuration")).set_defaults(
        func=_cmd_config
    )
    gen = _with_overrides(sub.add_parser("generate", help="write a synthetic DICOM consortium"))
    gen.add_argument("--output", required=True, help="output folder (one sub-folder per site)")
    gen.add_argument("--sites", type=int, default=0, help="number of sites (default: config)")
    gen.set_defaults(func=_cmd_generate)


def _coordinator_parsers(sub: Any) -> None:
    """provision, server, model: the coordinator's commands."""
    prov = sub.add_parser(
        "provision", help="consortium CA, SuperLink certificate and startup kits (idempotent)"
    )
    prov.add_argument("description", help="consortium description (YAML)")
    prov.add_argument("--output", required=True, help="folder for ca/, coordinator/, sites/")
    prov.add_argument(
        "--add-site", action="append", default=[], help="add a site awaiting enrolment"
    )
    prov.add_argument(
        "--enrol",
        action="append",
        default=[],
        metavar="FILE",
        help="enrol a site from the enrolment.json it made with `medfed site init`",
    )
    prov.add_argument(
        "--fingerprint",
        action="append",
        default=[],
        help="the enrolment's fingerprint, as the site read it to you (one per --enrol)",
    )
    prov.add_argument("--revoke", metavar="SITE", help="revoke a site: it can no longer connect")
    prov.set_defaults(func=_cmd_provision)

    server = sub.add_parser("server", help="coordinator commands").add_subparsers(
        dest="server_command", required=True
    )
    start = server.add_parser("start", help="start the SuperLink (TLS, node authentication)")
    start.add_argument("--kit", required=True, help="the coordinator kit")
    start.add_argument("--host", default="0.0.0.0", help="interface the Fleet gate listens on")
    start.add_argument("--port", type=int, help="the gate's port (default: the kit's address)")
    start.add_argument(
        "--control-port", type=int, help="the SuperLink's port on 127.0.0.1 (default: free)"
    )
    start.add_argument(
        "--database",
        help="a file for the SuperLink's state (default: in memory; sites are registered "
        "again at each start, runs are kept in MLflow)",
    )
    start.set_defaults(func=_cmd_server_start)
    console = server.add_parser("console", help="the coordinator's status page (sites, runs)")
    console.add_argument("--kit", required=True, help="the coordinator kit")
    console.add_argument("--runs", default="outputs", help="where the runs' folders are")
    console.add_argument("--tracking-uri", help="MLflow store of the runs (default: local)")
    console.add_argument(
        "--mlflow-ui", default="http://127.0.0.1:5000", help="the MLflow UI the links open"
    )
    _console_arguments(console, 8766)
    console.set_defaults(func=_cmd_server_console)
    model = sub.add_parser("model", help="the consortium's trained models").add_subparsers(
        dest="model_command", required=True
    )
    export = model.add_parser(
        "export", help="write a model (registry version, alias or run) as one file for a site"
    )
    _model_arguments(export)
    export.add_argument("--output", required=True, help="the package file to write")
    export.set_defaults(func=_cmd_model_export)


def _model_arguments(parser: Any) -> None:
    """--model and where to find it: the registry's store, the runs' folder."""
    parser.add_argument(
        "--model",
        required=True,
        help="models:/NAME/VERSION, models:/NAME@ALIAS, a run name or a model package file",
    )
    parser.add_argument("--tracking-uri", help="MLflow store of the registry (default: local)")
    parser.add_argument("--runs", default="outputs", help="where run folders are (a run name)")


def _site_parsers(sub: Any) -> None:
    """site: the hospital's commands."""
    site = sub.add_parser("site", help="site (hospital) commands").add_subparsers(
        dest="site_command", required=True
    )
    for add in (_site_agent_parsers, _site_data_parsers, _site_governance_parsers):
        add(site)


def _site_agent_parsers(site: Any) -> None:
    """The site agent's commands: start, init, join (its SuperNode and its keys)."""
    site_start = site.add_parser("start", help="start the site agent (Flower SuperNode)")
    site_start.add_argument("--kit", required=True, help="the site's startup kit")
    site_start.add_argument("--data", help="the site's DICOM folder (default: KIT/data)")
    site_start.add_argument("--state", help="policy/ledger folder (default: KIT/state)")
    site_start.add_argument("--superlink", help="host:port (default: the kit's address)")
    site_start.add_argument(
        "--poll-interval", type=float, default=0.5, help="seconds between idle polls"
    )
    site_start.set_defaults(func=_cmd_site_start)
    init = site.add_parser("init", help="make the site's own keys and its enrolment file")
    init.add_argument("--name", required=True, help="the site's name in the consortium")
    init.add_argument("--kit", required=True, help="the site's kit folder (created)")
    init.add_argument(
        "--rekey", action="store_true", help="retire the kit's keys (e.g. made by the coordinator)"
    )
    init.set_defaults(func=_cmd_site_init)
    join = site.add_parser("join", help="add the coordinator's public files to the site's kit")
    join.add_argument("--kit", required=True, help="the kit `medfed site init` made")
    join.add_argument("--bundle", required=True, help="the folder the coordinator sent back")
    join.set_defaults(func=_cmd_site_join)


def _site_data_parsers(site: Any) -> None:
    """The site's data commands: check, prepare, predict."""
    check = site.add_parser("check", help="check that a site folder holds usable labelled DICOM")
    check.add_argument("--data", required=True, help="the site's DICOM folder")
    check.set_defaults(func=_cmd_site_check)
    prep = site.add_parser(
        "prepare", help="prepare a site's DICOM (folder or PACS) into a cache with a manifest"
    )
    prep.add_argument(
        "--source",
        required=True,
        help="a folder, a DICOMweb URL (dicomweb://host:port/path or http(s)://...) or "
        "dimse://AET@host:port",
    )
    prep.add_argument("--output", required=True, help="folder for cache, manifest, quarantine")
    prep.add_argument("--state", help="the site's state folder (its data policy is applied)")
    prep.add_argument("--labels-csv", help="CSV of study/series class labels (label column)")
    prep.add_argument(
        "--spacing",
        type=float,
        nargs=3,
        metavar=("SLICE", "ROW", "COL"),
        help="resample to this spacing in mm",
    )
    prep.add_argument(
        "--require-deidentified",
        action="store_true",
        help="judge files against PS3.15's Basic Profile (the default; a site's data "
        "policy can turn it off)",
    )
    prep.add_argument("--modality", help="PACS query: modality, e.g. CT")
    prep.add_argument("--study-date", help="PACS query: YYYYMMDD or a range YYYYMMDD-YYYYMMDD")
    prep.add_argument("--series-description", help="PACS query: series description (wildcards)")
    prep.add_argument("-q", "--quiet", action="store_true", help="no progress bars")
    prep.set_defaults(func=_cmd_site_prepare)
    pred = site.add_parser(
        "predict", help="apply a trained model to new series: DICOM SEG or SR, to the PACS"
    )
    _model_arguments(pred)
    pred.add_argument("--source", required=True, help="a folder, dicomweb://... or dimse://...")
    pred.add_argument("--output", required=True, help="folder for results and their tables")
    pred.add_argument("--store-to", help="PACS for the results: dicomweb://... or dimse://...")
    pred.add_argument("--state", help="the site's state folder (data policy, audit log)")
    pred.add_argument("--by", help="who runs it, for the audit log (default: the login name)")
    pred.add_argument("--nifti", action="store_true", help="also write masks as NIfTI")
    pred.add_argument("--modality", help="PACS query: modality, e.g. CT")
    pred.add_argument("--study-date", help="PACS query: YYYYMMDD or a range YYYYMMDD-YYYYMMDD")
    pred.add_argument("--series-description", help="PACS query: series description (wildcards)")
    pred.set_defaults(func=_cmd_site_predict)
    _site_deid_parsers(site)


def _site_deid_parsers(site: Any) -> None:
    """De-identification at the site: deidentify, reidentify."""
    deid = site.add_parser(
        "deidentify", help="write a de-identified copy (PS3.15 Basic Profile and options)"
    )
    deid.add_argument("--source", required=True, help="a folder, dicomweb://... or dimse://...")
    deid.add_argument("--output", required=True, help="folder for the de-identified copy")
    deid.add_argument("--state", required=True, help="the site's state folder (pseudonym map)")
    deid.add_argument(
        "--profile",
        default="basic",
        help="comma-separated: basic plus options, e.g. basic,retain-long-modified-dates",
    )
    deid.add_argument("--modality", help="PACS query: modality, e.g. CT")
    deid.add_argument("--study-date", help="PACS query: YYYYMMDD or a range YYYYMMDD-YYYYMMDD")
    deid.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    deid.set_defaults(func=_cmd_site_deidentify)
    reid = site.add_parser("reidentify", help="what a pseudonym stands for (site staff only)")
    reid.add_argument("pseudonym", help="a pseudonym or a de-identified UID")
    reid.add_argument("--state", required=True, help="the site's state folder")
    reid.set_defaults(func=_cmd_site_reidentify)


def _console_arguments(parser: Any, port: int) -> None:
    parser.add_argument("--host", default="127.0.0.1", help="interface (default: loopback)")
    parser.add_argument("--port", type=int, default=port, help=f"port (default {port})")


def _cmd_site_console(args: argparse.Namespace) -> int:
    from client.console import create_site_console
    from federation.console import serve

    app, password = create_site_console(Path(args.state))
    if password is not None:
        print(f"first start: sign in as admin with the one-time password {password}")
    print(f"site console on http://{args.host}:{args.port}/ (Ctrl-C stops it)")
    serve(app, host=args.host, port=args.port)
    return 0


def _cmd_server_console(args: argparse.Namespace) -> int:
    from federation.console import serve
    from federation.tracking import default_tracking_uri
    from server.console import create_server_console

    app, password = create_server_console(
        Path(args.kit),
        outputs=Path(args.runs),
        tracking_uri=args.tracking_uri or default_tracking_uri(),
        mlflow_ui=args.mlflow_ui,
    )
    if password is not None:
        print(f"first start: sign in as admin with the one-time password {password}")
    print(f"coordinator console on http://{args.host}:{args.port}/ (Ctrl-C stops it)")
    serve(app, host=args.host, port=args.port)
    return 0


def _site_governance_parsers(site: Any) -> None:
    """What may run on the site's data: data-policy, policy, apps, plans."""
    dpol = site.add_parser("data-policy", help="set or show the site's data policy")
    dpol.add_argument("--state", required=True, help="the site's state folder")
    dpol.add_argument("--require-deidentified", choices=("yes", "no"))
    dpol.add_argument(
        "--on-phi",
        choices=("quarantine", "refuse"),
        help="a file that fails the gate: leave out its series, or refuse the round",
    )
    dpol.add_argument(
        "--private-tags",
        choices=("remove", "keep"),
        help="private attributes: fail the gate (the profile's rule), or accepted",
    )
    dpol.set_defaults(func=_cmd_site_data_policy)
    console = site.add_parser("console", help="the site's web console (plans, budget, data)")
    console.add_argument("--state", required=True, help="the site's state folder")
    _console_arguments(console, 8765)
    console.set_defaults(func=_cmd_site_console)
    _site_policy_parser(site)
    apps = site.add_parser(
        "apps", help="the code the site runs: its own release, or apps it approved"
    ).add_subparsers(dest="apps_command", required=True)
    apps_list = apps.add_parser("list", help="trusted apps and refused runs")
    apps_list.add_argument("--state", required=True, help="the site's state folder")
    apps_list.set_defaults(func=_cmd_apps_list)
    _decision_parsers(
        apps,
        "app",
        "the app's digest (or its first 16+ hex digits)",
        approve=("trust an app by its digest", _cmd_apps_approve),
        revoke=("stop trusting an approved app", _cmd_apps_revoke),
    )
    plans = site.add_parser(
        "plans", help="review, approve and revoke the training plans run on the site's data"
    ).add_subparsers(dest="plans_command", required=True)
    plans_list = plans.add_parser("list", help="plans requested or approved, with their status")
    plans_add = _with_overrides(
        plans.add_parser(
            "add", help="register the plan a run with these overrides will send, for review"
        )
    )
    plans_show = plans.add_parser("show", help="a plan's summary and diff to the last approved")
    for p in (plans_list, plans_add, plans_show):
        p.add_argument("--state", required=True, help="the site's state folder")
    plans_show.add_argument("plan", help="the plan's hash (or a unique prefix)")
    plans_list.set_defaults(func=_cmd_plans_list)
    plans_add.set_defaults(func=_cmd_plans_add)
    plans_show.set_defaults(func=_cmd_plans_show)
    _decision_parsers(
        plans,
        "plan",
        "the plan's hash (or a unique prefix)",
        approve=("approve a plan (recorded in the audit log)", _cmd_plans_approve),
        revoke=("revoke a plan's approval", _cmd_plans_revoke),
    )


def _site_policy_parser(site: Any) -> None:
    """The `site policy` parser: the privacy budget and what the site accepts to run."""
    policy = site.add_parser("policy", help="set or show the site's privacy budget and spend")
    policy.add_argument("--state", required=True, help="the site's state folder")
    policy.add_argument("--max-epsilon", type=float, help="budget per dataset, over all runs")
    policy.add_argument("--delta", type=float, default=1e-5, help="delta of the budget")
    policy.add_argument(
        "--require-plan-approval",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="train only on training plans approved with `medfed site plans approve`",
    )
    policy.add_argument("--allowed-tasks", nargs="*", help="task names the site may train")
    policy.add_argument("--max-rounds", type=int, help="most rounds per run (0: no limit)")
    policy.add_argument(
        "--min-dataset-size", type=int, help="fewest local training examples (0: no limit)"
    )
    policy.add_argument(
        "--min-noise-multiplier", type=float, help="lowest DP-SGD noise multiplier (0: no limit)"
    )
    policy.add_argument(
        "--max-epsilon-per-run", type=float, help="most epsilon one run may spend (0: no limit)"
    )
    policy.add_argument(
        "--allowed-accountants", nargs="*", choices=("rdp", "prv"), help="accepted accountants"
    )
    policy.add_argument(
        "--require-evaluation-approval",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="evaluate a model in an evaluation-only run only on an approved plan",
    )
    policy.add_argument(
        "--min-eval-examples", type=int, help="fewest held-out examples to release metrics on"
    )
    policy.add_argument(
        "--allow-model-sharing",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="let the site's own model go to the other sites for cross-site validation",
    )
    policy.set_defaults(func=_cmd_site_policy)


def _audit_parsers(sub: Any) -> None:
    """audit: the auditor's commands."""
    audit = sub.add_parser("audit", help="auditor commands").add_subparsers(
        dest="audit_command", required=True
    )
    verify = audit.add_parser("verify", help="verify signatures, chain and epsilon of ledgers")
    report = audit.add_parser("report", help="HTML and JSON privacy report of ledgers")
    for p in (verify, report):
        p.add_argument("ledgers", nargs="+", help="ledger files (JSON lines)")
        p.add_argument(
            "--keys",
            nargs="+",
            required=True,
            help="public keys: NAME.pub files, or folders holding them",
        )
    verify.set_defaults(func=_cmd_audit_verify)
    keys_cmd = audit.add_parser("keys", help="which public key belongs to which site, and why")
    keys_cmd.add_argument("--kit", required=True, help="the coordinator kit")
    keys_cmd.set_defaults(func=_cmd_audit_keys)
    report.add_argument("--output", required=True, help="folder for the report")
    report.set_defaults(func=_cmd_audit_report)
    eps = audit.add_parser("epsilon", help="epsilon of a subsampled Gaussian mechanism")
    eps.add_argument("--sample-rate", type=float, required=True)
    eps.add_argument("--noise-multiplier", type=float, required=True)
    eps.add_argument("--steps", type=int, required=True)
    eps.add_argument("--delta", type=float, required=True)
    eps.add_argument("--accountant", choices=("rdp", "prv"), default="rdp")
    eps.set_defaults(func=_cmd_audit_epsilon)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="medfed", description="Federated learning for hospital consortia."
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="show Flower's and Ray's logs")
    sub = parser.add_subparsers(dest="command", required=True)
    for add in (_run_parsers, _coordinator_parsers, _site_parsers, _audit_parsers):
        add(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `medfed` console script."""
    args = _parser().parse_args(argv)
    from federation.errors import FederationError, SiteRefusal
    from federation.flowerpatch import FlowerVersionError, check_flower_version
    from federation.logs import setup_logging

    setup_logging(verbose=args.verbose)
    try:
        check_flower_version()
        return int(args.func(args))
    except (
        ValueError,
        FederationError,
        SiteRefusal,
        FileNotFoundError,
        FileExistsError,
        FlowerVersionError,
        ConnectionError,
    ) as err:
        print(f"medfed: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
