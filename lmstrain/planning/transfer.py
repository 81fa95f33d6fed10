"""A model (not a measurement) of what swapping costs on a GPU: copy time vs compute time.

Swap-outs overlap the forward pass and swap-ins the backward pass (each on its own copy
engine). A step slows down by whatever copy time does not fit under the compute it overlaps:

    overhead = max(0, out_bytes / bw - forward_s) + max(0, in_bytes / bw - backward_s)

with ``forward_s = flops / 3 / throughput`` and ``backward_s = 2 * flops / 3 / throughput``
(the backward pass of a conv net costs about twice the forward). Bandwidths are the links'
stated peak per direction; the throughput is a stated fraction of a stated GPU's FP32 peak.
"""

LINKS = {  # stated peak bandwidth per direction, bytes/s
    "PCIe 3.0 x16": 15.75e9,
    "PCIe 4.0 x16": 31.5e9,
    "PCIe 5.0 x16": 63.0e9,
    "NVLink 2.0 CPU-GPU (POWER9 + V100, 3 links)": 75.0e9,
}
GPU = "NVIDIA V100 (15.7 TFLOP/s FP32 peak)"
GPU_FLOPS = 15.7e12
EFFICIENCY = 0.5
ASSUMPTIONS = (f"model, not a measurement: compute time = step FLOPs / ({EFFICIENCY:.0%} of "
               f"{GPU}), split 1/3 forward, 2/3 backward; copy time = bytes / stated peak link "
               "bandwidth per direction; swap-outs overlap the forward pass, swap-ins the "
               "backward pass; each swapped tensor is copied out once and in once per swap-in "
               "(once where the swap-ins are not given)")


def transfer_model(swapped_bytes, flops, swapped_in_bytes=None):
    """Per link: copy and compute times, the predicted overhead, and whether it is copy-bound.
    ``swapped_in_bytes``: bytes copied back (default: each swapped tensor once).

    >>> row = transfer_model(100e9, 10e12)["links"][0]
    >>> row["link"], row["bandwidth_bound"]
    ('PCIe 3.0 x16', True)
    """
    compute_s = flops / (GPU_FLOPS * EFFICIENCY)
    forward_s, backward_s = compute_s / 3, 2 * compute_s / 3
    rows = []
    for link, bandwidth in LINKS.items():
        copy_s = swapped_bytes / bandwidth
        copy_in_s = (swapped_bytes if swapped_in_bytes is None else swapped_in_bytes) / bandwidth
        overhead_s = max(0.0, copy_s - forward_s) + max(0.0, copy_in_s - backward_s)
        rows.append({
            "link": link, "bandwidth_bytes_per_s": bandwidth,
            "copy_out_s": copy_s, "copy_in_s": copy_in_s, "compute_s": compute_s,
            "overhead": overhead_s / compute_s if compute_s else None,
            "bandwidth_bound": overhead_s > 0,
        })
    return {"swapped_bytes_per_step": swapped_bytes, "flops_per_step": flops,
            "assumptions": ASSUMPTIONS, "links": rows}
