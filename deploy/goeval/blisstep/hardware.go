package blisstep

import (
	"fmt"
	"sort"
	"strings"
)

// Hardware is one GPU model: datasheet peaks that turn FLOPs and bytes into µs.
// It mirrors blis_model/hardware.py (HardwareSpec); units are in the field names.
type Hardware struct {
	Name            string
	TFlopsBF16      float64 // dense bf16/fp16 tensor-core peak, TFLOP/s
	TFlopsFP8       float64 // dense fp8 tensor-core peak, TFLOP/s (0 if unsupported)
	HBMTBs          float64 // HBM bandwidth, TB/s (1e12 bytes/s)
	MemoryGiB       float64
	InterconnectGBs float64 // per-direction GPU-GPU bandwidth (NVLink, else PCIe), GB/s
	PCIeGBs         float64 // per-direction host link bandwidth, GB/s
	SMCount         int     // streaming multiprocessors
}

// PeakFlopsPerUs is the tensor-core peak in FLOP/µs: the FP8 peak when weights are
// 1 byte (or less) and the GPU has FP8 units, else the bf16 peak.
func (h Hardware) PeakFlopsPerUs(weightBytesPerParam float64) float64 {
	if weightBytesPerParam <= 1 && h.TFlopsFP8 > 0 {
		return h.TFlopsFP8 * 1e6
	}
	return h.TFlopsBF16 * 1e6
}

// HBMBytesPerUs is the HBM bandwidth in bytes/µs.
func (h Hardware) HBMBytesPerUs() float64 { return h.HBMTBs * 1e6 }

// InterconnectBytesPerUs is the GPU-GPU bandwidth in bytes/µs.
func (h Hardware) InterconnectBytesPerUs() float64 { return h.InterconnectGBs * 1e3 }

// PCIeBytesPerUs is the host-link bandwidth in bytes/µs.
func (h Hardware) PCIeBytesPerUs() float64 { return h.PCIeGBs * 1e3 }

func (h Hardware) validate() error {
	if !(h.TFlopsBF16 > 0 && h.HBMTBs > 0 && h.InterconnectGBs > 0 && h.PCIeGBs > 0 &&
		h.SMCount > 0) || h.TFlopsFP8 < 0 {
		return fmt.Errorf("hardware %q: peaks, bandwidths and SM count must be > 0", h.Name)
	}
	return nil
}

// catalog mirrors blis_model/hardware.py _CATALOG (keep the two in step: the golden
// vectors cover every GPU they use).
var catalog = []Hardware{
	{"H100", 989.5, 1979.0, 3.35, 80.0, 450.0, 64.0, 132},
	{"H100-PCIe", 756.0, 1513.0, 2.0, 80.0, 64.0, 64.0, 114},
	{"H200", 989.5, 1979.0, 4.8, 141.0, 450.0, 64.0, 132},
	{"A100-80", 312.0, 0.0, 2.039, 80.0, 300.0, 32.0, 108},
	{"A100-40", 312.0, 0.0, 1.555, 40.0, 300.0, 32.0, 108},
	{"L40S", 362.05, 733.0, 0.864, 48.0, 32.0, 32.0, 142},
	{"B200", 2250.0, 4500.0, 8.0, 180.0, 900.0, 64.0, 148},
}

var aliases = map[string]string{
	"H100-SXM": "H100", "H100-SXM5": "H100", "H100-80": "H100", "H200-SXM": "H200",
	"A100": "A100-80", "A100-SXM": "A100-80", "A100-SXM-80": "A100-80", "A100-80GB": "A100-80",
	"A100-40GB": "A100-40", "A100-SXM-40": "A100-40", "B200-SXM": "B200",
}

// LookupHardware finds a GPU by name or alias, case-insensitively (as hardware_spec).
func LookupHardware(name string) (Hardware, error) {
	key := strings.ToUpper(strings.TrimSpace(name))
	for alias, canonical := range aliases {
		if strings.ToUpper(alias) == key {
			key = strings.ToUpper(canonical)
			break
		}
	}
	for _, h := range catalog {
		if strings.ToUpper(h.Name) == key {
			return h, nil
		}
	}
	return Hardware{}, fmt.Errorf("unknown hardware %q; known: %s", name,
		strings.Join(KnownHardware(), ", "))
}

// KnownHardware lists the catalog's canonical GPU names, sorted.
func KnownHardware() []string {
	names := make([]string, len(catalog))
	for i, h := range catalog {
		names[i] = h.Name
	}
	sort.Strings(names)
	return names
}
