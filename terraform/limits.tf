# CPU and memory pairs Cloud Run accepts (Cloud Run functions run on Cloud Run).
# "Configure CPU limits for services", https://cloud.google.com/run/docs/configuring/cpu:
#   below 0.5 vCPU: at most 512 MiB; below 1 vCPU: at most 1 GiB; 1 vCPU: up to 4 GiB;
#   2: up to 8 GiB; 4: 2 to 16 GiB; 6: 4 to 24 GiB; 8: 4 to 32 GiB.
# The jobs page (https://cloud.google.com/run/docs/configuring/jobs/cpu) gives 128 MiB as
# the least memory. Checked by a precondition on both functions, so a bad pair fails at
# plan instead of half-way through an apply. Only variables feed these locals.
locals {
  # Memory in MiB. Mi and Gi are binary, M and G decimal, as Cloud Run reads them.
  memory_units = { Mi = 1, Gi = 1024, M = 1000000 / 1048576, G = 1000000000 / 1048576 }
  memory_mib   = try(tonumber(regex("^[0-9]+", var.memory)) * local.memory_units[regex("[A-Za-z]+$", var.memory)], null)

  # [least, most] MiB for var.cpu; whole CPUs by name, fractions by range.
  cpu_memory_range = try(lookup(
    {
      "1" = [128, 4096]
      "2" = [128, 8192]
      "4" = [2048, 16384]
      "6" = [4096, 24576]
      "8" = [4096, 32768]
    },
    var.cpu,
    tonumber(var.cpu) < 0.5 ? [128, 512] : [128, 1024],
  ), null)

  cpu_memory_ok = try(
    local.memory_mib >= local.cpu_memory_range[0] && local.memory_mib <= local.cpu_memory_range[1],
    false,
  )
}
