"""Readers of the Slicer extension's static files, for the checks that run without Slicer.

Each function reads one kind of file as text or bytes and returns plain Python data; none imports the
module or its library:

- Python sources: :func:`python_files`, :func:`read`, and the parameter node wrapper read with ``ast``
  (:func:`module_constants`, :func:`parameter_fields`, :func:`ui_usages`, :func:`base_kind`);
- Qt Designer ``.ui`` files: :func:`ui_widgets`;
- CMake files: :func:`cmake_commands`, :func:`cmake_variables`, :func:`glob_matches`,
  :func:`module_cmake_files`, :func:`top_cmake`;
- the extension catalog entry (``<Extension>.json``, schema v1.0.1): :func:`validate_catalog_entry`;
- PNG images: :func:`png_size`.
"""

import ast
import fnmatch
import os
import re
import struct
import xml.etree.ElementTree as ET
import zlib


# ------------------------------------------------------------------------------------ Python sources
def python_files(folder):
    """Every .py file under ``folder`` (sorted; __pycache__ and *.egg-info folders skipped)."""
    out = []
    for dirpath, dirnames, filenames in os.walk(folder):
        dirnames[:] = [d for d in dirnames if d != "__pycache__" and not d.endswith(".egg-info")]
        out += [os.path.join(dirpath, f) for f in filenames if f.endswith(".py")]
    return sorted(out)


def read(path):
    """The text of a UTF-8 file."""
    with open(path, encoding="utf-8") as f:
        return f.read()


def module_constants(tree):
    """Module-level NAME = <literal> assignments (lists of choices and the like)."""
    consts = {}
    for node in tree.body:
        if isinstance(node, ast.Assign) and len(node.targets) == 1 and isinstance(node.targets[0], ast.Name):
            try:
                consts[node.targets[0].id] = ast.literal_eval(node.value)
            except ValueError:
                pass
    return consts


def _annotation_arguments(call, consts):
    """The arguments of an annotation call (``Choice([...])``): literals and module constants evaluated,
    anything else as its source text."""
    args = []
    for a in call.args:
        if isinstance(a, ast.Name) and a.id in consts:
            args.append(consts[a.id])
        else:
            try:
                args.append(ast.literal_eval(a))
            except ValueError:
                args.append(ast.unparse(a))
    return args


def parameter_fields(tree):
    """({name: (base type name, {annotation name: [args]}, default expression)}, class node) of the
    @parameterNodeWrapper class of a module's ``ast`` tree."""
    consts = module_constants(tree)
    classes = [
        n for n in tree.body
        if isinstance(n, ast.ClassDef)
        and any(isinstance(d, ast.Name) and d.id == "parameterNodeWrapper" for d in n.decorator_list)
    ]
    assert len(classes) == 1, "the module needs exactly one @parameterNodeWrapper class"
    fields = {}
    for item in classes[0].body:
        if not (isinstance(item, ast.AnnAssign) and isinstance(item.target, ast.Name)):
            continue
        ann = item.annotation
        extras = {}
        if isinstance(ann, ast.Subscript) and ast.unparse(ann.value) == "Annotated":
            elts = ann.slice.elts if isinstance(ann.slice, ast.Tuple) else [ann.slice]
            base = ast.unparse(elts[0])
            for e in elts[1:]:
                if isinstance(e, ast.Call):
                    extras[ast.unparse(e.func)] = _annotation_arguments(e, consts)
        else:
            base = ast.unparse(ann)
        fields[item.target.id] = (base, extras, item.value)
    return fields, classes[0]


def ui_usages(tree):
    """[(widget name, attribute or signal used or None, line)] for every ``self.ui.<name>`` in a module."""
    uses = []
    parents = {}
    for node in ast.walk(tree):
        for child in ast.iter_child_nodes(node):
            parents[child] = node
    for node in ast.walk(tree):
        if (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Attribute)
                and node.value.attr == "ui" and isinstance(node.value.value, ast.Name)
                and node.value.value.id == "self"):
            parent = parents.get(node)
            used = None
            if isinstance(parent, ast.Attribute) and parent.value is node:
                used = parent.attr
                call = parents.get(parent)
                if used == "connect" and isinstance(call, ast.Call) and call.args:
                    sig = call.args[0]
                    if isinstance(sig, ast.Constant) and isinstance(sig.value, str):
                        used = "signal:" + sig.value.split("(")[0]
            uses.append((node.attr, used, node.lineno))
    return uses


def base_kind(base):
    """The kind of a parameter's base type as parameterNodeWrapper's GUI connectors know it: a builtin
    name, 'FloatRange', 'path', 'node', 'list', or the type's own name."""
    if base in ("bool", "int", "float", "str", "FloatRange"):
        return base
    if base.startswith("pathlib.") or base in ("Path", "PurePath"):
        return "path"
    if re.fullmatch(r"(slicer\.)?vtkMRML\w+Node", base):
        return "node"
    if base.startswith(("list[", "List[")):
        return "list"
    return base


# ------------------------------------------------------------------------------------------ .ui files
def ui_widgets(ui_file):
    """({objectName: (class, {property: value}, SlicerParameterName or None)}, root widget name,
    [(sender, signal, receiver, slot)]) of a Qt Designer file."""
    root = ET.parse(ui_file).getroot()
    top = root.find("widget")
    widgets = {}
    for w in root.iter("widget"):
        props, param = {}, None
        for p in w.findall("property"):
            value = p[0] if len(p) else None
            text = None
            if value is not None:
                if value.tag == "stringlist":
                    text = [s.text or "" for s in value.findall("string")]
                else:
                    text = value.text or ""
            if p.get("name") == "SlicerParameterName":
                param = text
            props[p.get("name")] = text
        widgets[w.get("name")] = (w.get("class"), props, param)
    connections = [
        (c.findtext("sender"), c.findtext("signal"), c.findtext("receiver"), c.findtext("slot"))
        for c in root.iter("connection")
    ]
    return widgets, top.get("name"), connections


# --------------------------------------------------------------------------------------- CMake files
def cmake_commands(path):
    """[(command lower-case, [arguments])] of a CMake file (comments stripped, quotes kept as tokens)."""
    text = re.sub(r"(?m)#.*$", "", read(path))
    cmds = []
    for m in re.finditer(r"([A-Za-z_][A-Za-z0-9_]*)\s*\(((?:[^()]|\([^()]*\))*)\)", text):
        args = re.findall(r'"[^"]*"|[^\s"]+', m.group(2))
        cmds.append((m.group(1).lower(), [a.strip('"') for a in args]))
    return cmds


def cmake_variables(cmds, extra=None):
    """(variables set() in a CMake file (lists) with ${VAR} references expanded, its file(GLOB) calls as
    (variable, recursive, patterns), the expansion function)."""
    vars_ = dict(extra or {})

    def expand(token):
        return re.sub(r"\$\{(\w+)\}", lambda m: " ".join(vars_.get(m.group(1), [m.group(0)])), token)

    globs = []
    for cmd, args in cmds:
        if cmd == "set" and args:
            vars_[args[0]] = [v for a in args[1:] for v in expand(a).split()]
        elif cmd == "file" and args and args[0] in ("GLOB", "GLOB_RECURSE"):
            patterns = [expand(a) for a in args[2:] if "*" in a]
            globs.append((args[1], args[0] == "GLOB_RECURSE", patterns))
            vars_[args[1]] = ["<glob:" + args[1] + ">"]
    return vars_, globs, expand


def glob_matches(pattern, recurse, base):
    """Files (relative to ``base``) a CMake file(GLOB[_RECURSE]) pattern selects."""
    pattern = pattern.replace("${CMAKE_CURRENT_SOURCE_DIR}/", "")
    folder, mask = os.path.split(pattern)
    hits = []
    for dirpath, dirnames, filenames in os.walk(os.path.join(base, folder)):
        dirnames[:] = [d for d in dirnames if d != "__pycache__"]
        for f in filenames:
            if fnmatch.fnmatch(f, mask):
                hits.append(os.path.relpath(os.path.join(dirpath, f), base))
        if not recurse:
            break
    return sorted(hits)


def module_cmake_files(module_dir):
    """(files the module's CMakeLists.txt lists explicitly, files its globs select, parsed commands, the
    arguments of its one slicerMacroBuildScriptedModule call)."""
    cmds = cmake_commands(os.path.join(module_dir, "CMakeLists.txt"))
    vars_, globs, expand = cmake_variables(cmds)
    build = [args for cmd, args in cmds if cmd == "slicermacrobuildscriptedmodule"]
    assert len(build) == 1, "slicerMacroBuildScriptedModule must be called once"
    args = build[0]
    listed, globbed, section = [], [], None
    for a in args:
        if a in ("NAME", "SCRIPTS", "RESOURCES"):
            section = a
            continue
        if a in ("WITH_GENERIC_TESTS", "WITH_SUBDIR", "VERBOSE"):
            section = None
            continue
        if section in ("SCRIPTS", "RESOURCES"):
            for v in expand(a).split():
                if v.startswith("<glob:"):
                    globbed += _glob_variable(v[6:-1], globs, module_dir)
                else:
                    listed.append(v)
    return listed, globbed, cmds, args


def _glob_variable(name, globs, base):
    """The files the file(GLOB) that set variable ``name`` selects (each pattern must match a file)."""
    hits = []
    for gname, recurse, patterns in globs:
        if gname == name:
            for p in patterns:
                matched = glob_matches(p, recurse, base)
                assert matched, f"CMake glob '{p}' matches no file"
                hits += matched
    return hits


def top_cmake(root):
    """(parsed commands, {variable: value joined by spaces}) of the extension's top-level CMakeLists.txt."""
    cmds = cmake_commands(os.path.join(root, "CMakeLists.txt"))
    vars_, _, _ = cmake_variables(cmds)
    return cmds, {k: " ".join(v) for k, v in vars_.items()}


# ------------------------------------------------------------------------------ extension catalog entry
# The extension index schema v1.0.1 (Slicer/Schemas/slicer-extension-catalog-entry-schema-v1.0.1.json):
# required keys, allowed keys with their JSON types, and the constraints it sets.
SCHEMA_URL = "https://raw.githubusercontent.com/Slicer/Slicer/main/Schemas/slicer-extension-catalog-entry-schema-v1.0.1.json#"
SCHEMA_REQUIRED = ("$schema", "category", "scm_url")
SCHEMA_TYPES = {"$schema": str, "category": str, "scm_url": str, "scm_revision": str, "scm_type": str,
                "build_dependencies": list, "build_subdirectory": str, "enabled": bool, "tier": int}


def validate_catalog_entry(entry):
    """Problems of a catalog entry against schema v1.0.1 (empty list when valid)."""
    if not isinstance(entry, dict):
        return ["the entry must be a JSON object"]
    problems = [f"missing required key '{k}'" for k in SCHEMA_REQUIRED if k not in entry]
    for key, value in entry.items():
        if key not in SCHEMA_TYPES:
            problems.append(f"key '{key}' is not allowed (additionalProperties is false)")
        elif not isinstance(value, SCHEMA_TYPES[key]) or (SCHEMA_TYPES[key] is int and isinstance(value, bool)):
            problems.append(f"'{key}' must be a {SCHEMA_TYPES[key].__name__}")
    if "scm_type" in entry and entry["scm_type"] not in ("git", "local"):
        problems.append("scm_type must be 'git' or 'local'")
    if isinstance(entry.get("tier"), int) and not 1 <= entry["tier"] <= 5:
        problems.append("tier must be 1..5")
    if isinstance(entry.get("build_dependencies"), list) and not all(
            isinstance(d, str) for d in entry["build_dependencies"]):
        problems.append("build_dependencies must be strings")
    return problems


# ---------------------------------------------------------------------------------------- PNG images
def png_size(path):
    """(width, height) of a valid PNG: signature, chunk CRCs, IHDR first, IEND last, decodable IDAT."""
    with open(path, "rb") as f:
        data = f.read()
    assert data[:8] == b"\x89PNG\r\n\x1a\n", f"{path} is not a PNG"
    pos, chunks, idat = 8, [], b""
    while pos < len(data):
        (length,) = struct.unpack(">I", data[pos:pos + 4])
        kind = data[pos + 4:pos + 8]
        body = data[pos + 8:pos + 8 + length]
        (crc,) = struct.unpack(">I", data[pos + 8 + length:pos + 12 + length])
        assert zlib.crc32(kind + body) & 0xFFFFFFFF == crc, f"{path}: bad CRC in {kind!r}"
        chunks.append(kind)
        if kind == b"IDAT":
            idat += body
        pos += 12 + length
    assert chunks[0] == b"IHDR" and chunks[-1] == b"IEND", f"{path}: malformed chunk order"
    width, height, depth, colour = struct.unpack(">IIBB", data[16:26])
    channels = {0: 1, 2: 3, 3: 1, 4: 2, 6: 4}[colour]
    raw = zlib.decompress(idat)
    assert len(raw) == height * (1 + width * channels * depth // 8), f"{path}: pixel data has the wrong size"
    return width, height
