#!/bin/busybox sh
# /init of the lab guest (drtool/lab/guest.py builds the initramfs around it).
#
# Every boot first VERIFIES the records on disk A (/dev/vda) and disk B (/dev/vdb)
# and reports on the console, then, unless drguest.mode=verify, WRITES numbered
# records from the one after the last acknowledged: record n to sector n of A, then
# of B, each with O_DIRECT and fsync, and prints "ACK n t=<uptime cs>" once both are
# on disk. drguest.mode=bench instead times a dd of drguest.bench_mib MiB on disk A.
#
# A record is one 512-byte sector, one line of text:
#   DRREC n boot t sum <spaces> sum n CERD
# t: the guest's uptime in centiseconds when written; boot: a random number per
# boot; sum: a checksum over n, boot and t, at both ends so a sector that mixes
# two writes (or garbage) is caught.
/bin/busybox mkdir -p /proc /sys /dev /tmp /bin
/bin/busybox mount -t proc proc /proc
/bin/busybox --install -s /bin
export PATH=/bin
mount -t sysfs sys /sys
mount -t devtmpfs dev /dev 2>/dev/null

uptime_cs() {
    read up rest < /proc/uptime
    echo $(( ${up%.*} * 100 + 1${up#*.} - 100 ))
}

read u < /proc/sys/kernel/random/uuid
boot=$(( 0x${u%%-*} ))
echo "GUEST up t=$(uptime_cs) boot=$boot"

mode=write; records=0; interval_ms=0; bench_mib=0
for arg in $(cat /proc/cmdline); do
    case "$arg" in
        drguest.mode=*) mode=${arg#*=} ;;
        drguest.records=*) records=${arg#*=} ;;
        drguest.interval_ms=*) interval_ms=${arg#*=} ;;
        drguest.bench_mib=*) bench_mib=${arg#*=} ;;
    esac
done

for m in virtio_ring virtio virtio_pci_legacy_dev virtio_pci_modern_dev virtio_pci virtio_blk; do
    insmod /lib/modules/$m.ko || echo "GUEST error: insmod $m failed"
done
i=0
while [ ! -b /dev/vda ] || [ ! -b /dev/vdb ]; do
    i=$((i + 1))
    if [ $i -gt 500 ]; then echo "GUEST error: no /dev/vda and /dev/vdb"; poweroff -f; fi
    usleep 10000
done

if [ "$mode" = bench ]; then
    # Round k starts when the host has written byte k into sector 0 of disk B
    # (GuestConsole.bench_round does, through the device); it writes bench_mib
    # MiB of zeros at a fresh place on disk A with O_DIRECT and fsync, timed here.
    echo "BENCH ready"
    round=1
    while true; do
        go=$(( $(dd if=/dev/vdb bs=512 count=1 iflag=direct 2>/dev/null | od -An -tu1 -N1) + 0 ))
        if [ "$go" -eq "$round" ]; then
            t0=$(uptime_cs)
            dd if=/dev/zero of=/dev/vda bs=1M seek=$(( (round - 1) * bench_mib )) count=$bench_mib \
                oflag=direct conv=fsync 2>/dev/null || echo "GUEST error: bench write failed"
            t1=$(uptime_cs)
            echo "BENCH round=$round mib=$bench_mib cs=$((t1 - t0))"
            round=$((round + 1))
        fi
        usleep 100000
    done
fi

verify() {
    for disk in vda vdb; do
        echo "@@DISK $disk"
        dd if=/dev/$disk bs=1M iflag=direct 2>/dev/null | tr '\0' ' ' | fold -w 512
        echo  # the last sector may end without a newline
    done | awk '
    /^@@DISK / { d = $2; sector = -1; next }
    { sector++ }
    NF == 0 { next }
    {
        ok = ($1 == "DRREC" && NF == 8 && $8 == "CERD" && $5 == $6 && $7 == $2 && $2 == sector &&
              ($2 * 2654435761 + $3 * 40503 + $4 * 97) % 4294967291 == $5 + 0)
        if (!ok) { garbage[d]++; next }
        n = $2 + 0
        seen[d, n] = 1; count[d]++
        if (n > max[d]) { max[d] = n; last_t[d] = $4; last_boot[d] = $3 }
    }
    END {
        for (k = 0; k < 2; k++) {
            d = (k == 0) ? "vda" : "vdb"
            gaps = 0; first = 0
            for (n = 1; n <= max[d]; n++) if (!((d, n) in seen)) { gaps++; if (!first) first = n }
            printf "VERIFY disk=%s max=%d count=%d gaps=%d first_gap=%d garbage=%d last_t=%d last_boot=%s\n",
                   d, max[d], count[d], gaps, first, garbage[d], last_t[d], (last_boot[d] == "" ? 0 : last_boot[d])
        }
        ahead = 0
        for (n = 1; n <= max["vdb"]; n++) if (((("vdb", n) in seen)) && !(("vda", n) in seen)) ahead++
        if (max["vdb"] > max["vda"]) ahead++
        printf "VERIFY done b_ahead=%d next=%d\n", ahead, max["vdb"] + 1
    }'
}

verify > /tmp/verify
cat /tmp/verify
[ "$mode" = verify ] && while true; do sleep 3600; done

# Continue after the last record on B: a record on A alone was never acknowledged.
next=$(sed -n 's/^VERIFY done .* next=\([0-9]*\)$/\1/p' /tmp/verify)
n=${next:-1}
echo "WRITER next=$n boot=$boot"
end=$(( records > 0 ? n + records : 0 ))
while [ $end -eq 0 ] || [ $n -lt $end ]; do
    t=$(uptime_cs)
    sum=$(( (n * 2654435761 + boot * 40503 + t * 97) % 4294967291 ))
    head="DRREC $n $boot $t $sum"
    tail="$sum $n CERD"
    printf "%-$((511 - ${#tail}))s%s\n" "$head" "$tail" > /tmp/rec
    dd if=/tmp/rec of=/dev/vda bs=512 seek=$n count=1 oflag=direct conv=fsync 2>/dev/null || { echo "GUEST error: write $n to A failed"; break; }
    dd if=/tmp/rec of=/dev/vdb bs=512 seek=$n count=1 oflag=direct conv=fsync 2>/dev/null || { echo "GUEST error: write $n to B failed"; break; }
    echo "ACK $n t=$(uptime_cs)"
    n=$((n + 1))
    [ "$interval_ms" -gt 0 ] && usleep $((interval_ms * 1000))
done
echo "WRITER done last=$((n - 1))"
while true; do sleep 3600; done
