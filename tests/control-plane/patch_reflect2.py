"""Applies reflect2 1.0.2's Go 1.18 fix to the vendored reflect2 1.0.1 of Kubernetes 1.20.

Go 1.18 changed reflect.mapiterinit from returning a *hiter to filling one the caller
allocates; 1.0.1 still declares the old signature, and the API server faults (SIGSEGV in
mapiterinit) when it iterates a map through reflect2. Idempotent.
"""

import pathlib
import sys

root = pathlib.Path(sys.argv[1])
link = root / "unsafe_link.go"
text = link.read_text()
old_decl = "func mapiterinit(rtype unsafe.Pointer, m unsafe.Pointer) *hiter"
new_decl = "func mapiterinit(rtype unsafe.Pointer, m unsafe.Pointer, it *hiter)"
old_struct = """	value unsafe.Pointer // Must be in second position (see cmd/internal/gc/range.go).
	// rest fields are ignored
}"""
# The runtime's full layout (runtime/map.go, Go 1.18-1.21): reflect writes every field.
new_struct = """	value unsafe.Pointer // Must be in second position (see cmd/internal/gc/range.go).
	t           unsafe.Pointer
	h           unsafe.Pointer
	buckets     unsafe.Pointer
	bptr        unsafe.Pointer
	overflow    *[]unsafe.Pointer
	oldoverflow *[]unsafe.Pointer
	startBucket uintptr
	offset      uint8
	wrapped     bool
	B           uint8
	i           uint8
	bucket      uintptr
	checkBucket uintptr
}"""
if new_decl not in text:
    assert old_decl in text and old_struct in text, "unexpected reflect2 source"
    link.write_text(text.replace(old_decl, new_decl).replace(old_struct, new_struct))

umap = root / "unsafe_map.go"
text = umap.read_text()
old_call = """	return &UnsafeMapIterator{
		hiter:      mapiterinit(type2.rtype, *(*unsafe.Pointer)(obj)),"""
new_call = """	var it hiter
	mapiterinit(type2.rtype, *(*unsafe.Pointer)(obj), &it)
	return &UnsafeMapIterator{
		hiter:      &it,"""
if new_call not in text:
    assert old_call in text, "unexpected reflect2 source"
    umap.write_text(text.replace(old_call, new_call))
