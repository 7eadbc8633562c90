"""drtool check's pure logic: judging digests, thresholds, and the monitoring outputs."""

from __future__ import annotations

import pytest

from drtool.cli.prometheus import check_metrics, status_metrics, write_textfile
from drtool.cli.render import nagios_line
from drtool.errors import UsageError
from drtool.mechanics.hasher import ZERO, ChunkHashes
from drtool.mechanics.repair import REPAIR_BATCH, repair_batches
from drtool.mechanics.verify import chunks_touched, judge, ranges_of, zero_digest
from drtool.services.check import (
    CheckReport,
    CheckStatus,
    DiskCheck,
    Thresholds,
    VmCheck,
    _judge,
    check,
)
from drtool.services.status import DiskStatus, StatusReport, VmStatus
from drtool.state.protection import Health
from drtool.units import parse_duration, parse_size

from .test_services import inventory

MiB = 1 << 20


def hashes(chunks: dict[int, str], size: int = 4 * MiB) -> ChunkHashes:
    return ChunkHashes(size, chunks, 0, 0.0)


def test_judge_compares_digests_and_leaves_written_chunks_for_later():
    zero = zero_digest(MiB)
    source = hashes({0: "aa", MiB: ZERO, 2 * MiB: "cc", 3 * MiB: "dd"})
    replica = hashes({0: "aa", MiB: zero, 2 * MiB: "c0", 3 * MiB: "d0"})
    verdicts = judge(source, replica, MiB, moved={3 * MiB})
    assert verdicts.same == {0, MiB}  # "0" on one side equals an all-zero chunk read on the other
    assert verdicts.differ == {2 * MiB}
    assert verdicts.moved == {3 * MiB}  # written since the point: neither same nor different
    assert verdicts.compared_bytes == 3 * MiB


def test_chunks_both_sides_report_as_zeros_are_not_counted_as_compared():
    verdicts = judge(hashes({0: ZERO, MiB: ZERO}, 2 * MiB), hashes({0: ZERO, MiB: ZERO}, 2 * MiB), MiB, set())
    assert verdicts.same == {0, MiB} and verdicts.compared_bytes == 0


def test_a_chunk_hashed_on_one_side_only_is_an_error_not_a_verdict():
    with pytest.raises(Exception, match="one side only"):
        judge(hashes({0: "aa"}), hashes({}), MiB, set())


def test_the_last_chunk_of_an_odd_sized_disk_is_short():
    size = MiB + 4096
    verdicts = judge(hashes({MiB: ZERO}, size), hashes({MiB: zero_digest(4096)}, size), MiB, set())
    assert verdicts.same == {MiB} and verdicts.compared_bytes == 4096
    assert ranges_of({0, MiB}, MiB, size) == [(0, size)]


def test_dirty_ranges_map_to_every_chunk_they_touch():
    assert chunks_touched([(MiB - 1, 2)], MiB) == {0, MiB}
    assert chunks_touched([(5 * MiB, MiB)], MiB) == {5 * MiB}
    assert chunks_touched([(0, 0)], MiB) == set()
    assert ranges_of({0, MiB, 3 * MiB}, MiB, 8 * MiB) == [(0, 2 * MiB), (3 * MiB, MiB)]


def vm_check(**kw) -> VmCheck:
    base = {"vm": "web", "status": CheckStatus.OK, "summary": "", "replication": Health.IN_SYNC, "lag_bytes": 0,
            "newest_point_age": 60.0, "disks": (DiskCheck("vd0", 8 * MiB, Health.IN_SYNC, 0, compared_bytes=MiB),)}
    return VmCheck(**(base | kw))


@pytest.mark.parametrize(("change", "thresholds", "status", "words"), [
    ({}, Thresholds(), CheckStatus.OK, "matches"),
    ({"newest_point_age": 1000.0}, Thresholds(warn_rpo=900), CheckStatus.WARNING, "1000 s old"),
    ({"newest_point_age": 1000.0}, Thresholds(warn_rpo=60, crit_rpo=900), CheckStatus.CRITICAL, "1000 s old"),
    ({"newest_point_age": None}, Thresholds(warn_rpo=60), CheckStatus.WARNING, "no point"),
    ({"lag_bytes": 100 * MiB}, Thresholds(), CheckStatus.WARNING, "lags"),
    ({"lag_bytes": MiB}, Thresholds(), CheckStatus.OK, "matches"),
    ({"disks": (DiskCheck("vd0", 8 * MiB, Health.IN_SYNC, 0, differing=((MiB, MiB),)),)}, Thresholds(),
     CheckStatus.CRITICAL, "content differs: vd0 1 range(s), 1048576 bytes"),
    ({"disks": (DiskCheck("vd0", 8 * MiB, Health.IN_SYNC, 0, repaired=((MiB, MiB),)),)}, Thresholds(),
     CheckStatus.OK, "after repairing vd0"),
    ({"repair_error": "the mirrors did not drain"}, Thresholds(), CheckStatus.CRITICAL, "repair failed: the mirrors"),
])
def test_status_follows_the_monitoring_convention(change, thresholds, status, words):
    result = _judge(vm_check(**change), thresholds, [])
    assert result.status == status and words in result.summary, result.summary


def test_a_disk_left_out_of_replication_and_broken_replication_are_critical():
    assert _judge(vm_check(), Thresholds(), ["vd1"]).status == CheckStatus.CRITICAL
    broken = _judge(vm_check(summary="replication broken", replication=Health.BROKEN), Thresholds(), [], broken=True)
    assert broken.status == CheckStatus.CRITICAL and "replication broken (broken)" in broken.summary


def test_the_report_exits_with_the_worst_status():
    report = CheckReport((vm_check(), vm_check(vm="db", status=CheckStatus.UNKNOWN, summary="could not check")))
    assert report.exit_code == CheckStatus.UNKNOWN


def test_nagios_line_has_the_status_summary_and_performance_data():
    report = CheckReport((vm_check(summary="replica matches the source", seconds=12.5),))
    line = nagios_line(report)
    head, perf = line.split(" | ")
    assert head == "DRTOOL OK - web: replica matches the source"
    assert perf.split() == ["'web_differing'=0B;;0", "'web_lag'=0B", "'web_point_age'=60s", "'web_duration'=12.5s"]


def test_prometheus_metrics_per_vm_and_disk(tmp_path):
    report = CheckReport((vm_check(seconds=3.0, disks=(DiskCheck("vd0", 8 * MiB, Health.IN_SYNC, 0, compared_bytes=MiB,
                                                                differing=((0, MiB),)),)),))
    text = check_metrics(report, now=1700000000.0)
    assert 'drtool_check_status{vm="web"} 0' in text
    assert 'drtool_check_mismatched_bytes{vm="web",disk="vd0"} 1048576' in text
    assert 'drtool_replication_in_sync{vm="web"} 1' in text
    assert 'drtool_newest_point_age_seconds{vm="web"} 60' in text
    assert 'drtool_check_last_run_timestamp_seconds{vm="web"} 1.7e+09' in text
    assert text.count("# TYPE drtool_check_status gauge") == 1
    path = tmp_path / "drtool.prom"
    write_textfile(path, text)
    assert path.read_text() == text and [p.name for p in tmp_path.iterdir()] == ["drtool.prom"]


def test_status_metrics_say_in_sync_lag_and_point_age():
    disk = DiskStatus("vd0", "n", "qcow2", MiB, "/x", True, Health.LAGGING, 4096)
    report = StatusReport((VmStatus("web", "kvm1", "kvm2", "running", Health.LAGGING, (disk,), newest_point_age=5.0),))
    text = status_metrics(report)
    assert 'drtool_replication_in_sync{vm="web"} 0' in text
    assert 'drtool_replication_lag_bytes{vm="web"} 4096' in text
    assert 'drtool_disk_lag_bytes{vm="web",disk="vd0"} 4096' in text


def test_bad_requests_are_refused_before_any_host_is_contacted():
    with pytest.raises(UsageError, match="not both"):
        check(inventory(), reach=None, names=["web"], all_vms=True)  # type: ignore[arg-type]
    with pytest.raises(UsageError, match="power of two"):
        check(inventory(), reach=None, names=["web"], thresholds=Thresholds(chunk=3 * MiB))  # type: ignore[arg-type]
    with pytest.raises(UsageError, match="unknown VM"):
        check(inventory(), reach=None, names=["nope"])  # type: ignore[arg-type]


def test_repairs_are_cut_into_batches_of_bounded_size():
    batches = repair_batches([(0, REPAIR_BATCH + MiB), (10 * REPAIR_BATCH, MiB)])
    assert batches == [[(0, REPAIR_BATCH)], [(REPAIR_BATCH, MiB), (10 * REPAIR_BATCH, MiB)]]


def test_durations_and_sizes():
    assert parse_duration("15m") == 900 and parse_duration("2h") == 7200 and parse_duration("30") == 30
    assert parse_size("1M") == MiB and parse_size("64KiB") == 64 << 10
    for bad in ("soon", "-5m"):
        with pytest.raises(ValueError):
            parse_duration(bad)
    with pytest.raises(ValueError):
        parse_size("lots")


@pytest.mark.parametrize(("args", "message"), [
    (["web", "--warn-rpo", "soon"], "'soon' is not a duration"),
    (["web", "--all"], "not both"),
    (["--history"], "--history takes one VM"),
    (["web", "--nagios", "--json"], "pick one"),
])
def test_check_refuses_bad_input_as_unknown_in_one_line(tmp_path, args, message):
    from .test_cli import GOOD, drtool

    cfg = tmp_path / "drtool.toml"
    cfg.write_text(GOOD.format(addr="192.0.2.1"))  # TEST-NET: never contacted
    result = drtool("--config", str(cfg), "check", *args)
    assert result.returncode == 3, result.stderr
    [line] = result.stderr.strip().splitlines()
    assert line.startswith("drtool: error: ") and message in line, line
