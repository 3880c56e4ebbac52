"""Issue 10 item 3: runs may have up to 10**7 partitions; part names grow past 5 digits only when needed, runs
written with 5-digit names stay readable, and a name that would alias another part's is refused."""

from __future__ import annotations

import pytest

from easyroutine_dist.errors import MetadataError
from easyroutine_dist.storage import layout
from easyroutine_dist.storage.runs import record_part_ids

ATTEMPT = "0123456789abcdef"


@pytest.mark.parametrize("pid, digits", [(0, "00000"), (99_999, "99999"), (100_000, "100000"),
                                         (9_999_999, "9999999")])
def test_part_names_up_to_ten_million(pid, digits):
    assert layout.MAX_PARTS == 10_000_000
    assert layout.check_part_id(pid) == pid
    name = layout.shard_name(pid, 3, ATTEMPT)
    assert name == f"shards/part-{digits}-0003-{ATTEMPT}.safetensors"
    assert layout.check_shard_file(name.split("/", 1)[1], pid)
    assert layout.record_name(pid) == f"records/part-{digits}.json"
    assert record_part_ids([f"part-{digits}.json"]) == [pid]


def test_limits_and_aliases_are_refused():
    for bad in (10_000_000, -1, 1.0, True):
        with pytest.raises(MetadataError):
            layout.check_part_id(bad)
    for alias in ("part-012345-0000.safetensors", "part-0012345-0000.safetensors", "part-0000001-0000.safetensors",
                  "part-12345678-0000.safetensors"):
        with pytest.raises(MetadataError):
            layout.check_shard_file(alias)
    names = ["part-00007.json", "part-123456.json", "part-012345.json", "part-00007.json.tmp-1", "part-1.json"]
    assert record_part_ids(names) == [7, 123456]  # the aliasing and malformed names are strays


def test_the_partition_cap_is_the_part_id_limit():
    from easyroutine_dist.distributed.partitions import MAX_PARTITIONS

    assert MAX_PARTITIONS == 10_000_000
