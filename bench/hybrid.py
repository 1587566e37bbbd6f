#!/usr/bin/env python3
# bench/hybrid.py BASE DONOR OUT REGEX: a copy of EXL2 model BASE whose tensors matching REGEX come from DONOR
# (both conversions of the same source; module-level tensor groups are swapped). For ppl / KLD only: the
# copied mixbit-manifest.json no longer matches, so `mixbit verify` rejects the hybrid.
import json, os, re, shutil, struct, sys
base, donor, out, rx = sys.argv[1:5]
r = re.compile(rx)
def read(p):
    f = open(p, 'rb'); n = struct.unpack('<Q', f.read(8))[0]; h = json.loads(f.read(n)); return f, 8 + n, h
fb, ob, hb = read(base + '/output.safetensors')
fd, od, hd = read(donor + '/output.safetensors')
os.makedirs(out, exist_ok=True)
for x in os.listdir(base):
    if x not in ('output.safetensors',) and os.path.isfile(base + '/' + x): shutil.copy(base + '/' + x, out + '/' + x)
names = sorted(k for k in hb if k != '__metadata__')
mods = set()
hdr, blobs, off = {}, [], 0
for k in names:
    src = (fd, od, hd) if r.search(k) and k in hd else (fb, ob, hb)
    if src[2] is hd: mods.add(k.rsplit('.', 1)[0])
    e = src[2][k]; a, b = e['data_offsets']
    src[0].seek(src[1] + a); data = src[0].read(b - a)
    hdr[k] = {'dtype': e['dtype'], 'shape': e['shape'], 'data_offsets': [off, off + len(data)]}
    blobs.append(data); off += len(data)
if '__metadata__' in hb: hdr['__metadata__'] = hb['__metadata__']
hj = json.dumps(hdr, separators=(',', ':')).encode()
hj += b' ' * ((8 - len(hj) % 8) % 8)
with open(out + '/output.safetensors', 'wb') as f:
    f.write(struct.pack('<Q', len(hj))); f.write(hj)
    for b in blobs: f.write(b)
print(f"{len(mods)} modules from the donor", file=sys.stderr)
